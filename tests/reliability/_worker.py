"""A child process for the reliability tests: fitting or generator training with a resumable store,
or one promotion.

``python -m tests.reliability._worker fit|generator WORK OUT [--hang-at N]`` runs the job with its
work directory WORK and saves the result to OUT (safetensors). With ``--hang-at N`` the process
prints ``HANG`` and sleeps at a known point, so the parent can SIGKILL it there: before the N-th
call of the chunk fit (fitting) or after training step N (generator, between checkpoints).

``python -m tests.reliability._worker promote ROOT OUT --cand DIR --delay S`` runs the promote stage
for the candidate DIR (``bundle/`` and ``evaluate/``) against the registry of ROOT, waiting S
seconds after reading the champion (a wide window for another promotion to race through).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

N_EDITS, CHUNK = 6, 2  # fitting: three chunks of two edits
GEN_STEPS, GEN_EVERY = 30, 10  # generator: checkpoints at steps 10, 20, 30


def _hang(label: str) -> None:
    print(f"HANG {label}", flush=True)
    time.sleep(600)


def _tiny_llama():
    from meg import lm

    if not hasattr(_tiny_llama, "loaded"):  # built once per process
        _tiny_llama.loaded = lm.tiny_model("llama", lm.load_tokenizer(lm.DEFAULT_MODEL))
    return _tiny_llama.loaded


def fit_job(work: str, hang_at: int | None) -> dict[str, torch.Tensor]:
    from meg import fit
    from tests.conftest import make_edit
    from tests.unit.test_fit import EDITS

    loaded = _tiny_llama()
    if hang_at is not None:
        real, calls = fit._fit_chunk, [0]

        def hanging(*args, **kwargs):
            calls[0] += 1
            if calls[0] == hang_at:
                _hang(f"chunk call {hang_at}")
            return real(*args, **kwargs)

        fit._fit_chunk = hanging
    edits = [make_edit(i, p, t) for i, (p, t) in enumerate(EDITS[:N_EDITS])]
    cfg = fit.FitConfig(layer=2, optimizer="adam", lr=0.3, max_steps=40, chunk_size=CHUNK, suffix="")
    result = fit.fit_edits(loaded, edits, cfg, store_dir=work, progress=False)
    return {"weights": result.weights, "success": result.success, "steps": result.steps, "loss": result.loss}


def generator_pairs(n: int = 12, c: int = 16, d: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = F.normalize(torch.randn(n, c, generator=g), dim=1)
    w0 = torch.randn(d, generator=g) * 0.1
    w = w0 + torch.tanh(cond @ torch.randn(c, 32, generator=g) * 2) @ torch.randn(32, d, generator=g)
    return cond, w, w0


def generator_config(**overrides):
    from meg.generator import GeneratorConfig

    base = dict(width=32, depth=2, heads=2, batch_size=8, max_steps=GEN_STEPS, eval_every=5, eval_size=8,
                eval_steps=3, sample_steps=3, checkpoint_every=GEN_EVERY, warmup_steps=5, target_error=1e-6)
    return GeneratorConfig(**{**base, **overrides})


def generator_job(work: str, hang_at: int | None) -> dict[str, torch.Tensor]:
    from meg.generator import WeightGenerator

    gen = WeightGenerator(generator_config())
    if hang_at is not None:
        real = gen._train_step

        def hanging(*args):
            loss = real(*args)
            if args[-1] + 1 == hang_at:  # args[-1]: the step
                _hang(f"after step {hang_at}")
            return loss

        gen._train_step = hanging
    cond, w, w0 = generator_pairs()
    history = gen.fit(cond, w, w0, ckpt_dir=work, progress=False)
    out = {f"ema.{k}": v for k, v in gen.ema.state_dict().items()}
    out["sample"] = gen.sample(cond)
    out["errors"] = torch.tensor([h["error"] for h in history], dtype=torch.float64)
    out["losses"] = torch.tensor([h["loss"] for h in history], dtype=torch.float64)
    return out


def promote_job(root: str, out: str, cand: str, delay: float) -> None:
    from pathlib import Path

    from meg import config, tracking
    from meg.stages import promote

    tracking.configure(root)
    real = tracking.Registry.champion

    def slow_champion(self, alias):
        found = real(self, alias)
        time.sleep(delay)
        return found

    tracking.Registry.champion = slow_champion
    view = config.load_params(Path(root) / "params.yaml")
    promote.run(view, Path(root) / "prepare", Path(cand) / "evaluate", Path(cand) / "bundle", Path(out),
                tracking.Registry("meg-editor"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("job", choices=["fit", "generator", "promote"])
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--cand", default=None)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.job == "promote":
        promote_job(args.work, args.out, args.cand, args.delay)
        print("DONE", flush=True)
        return 0
    torch.set_num_threads(1)
    tensors = (fit_job if args.job == "fit" else generator_job)(args.work, args.hang_at)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
