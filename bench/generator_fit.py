"""How well the weight generator learns real fitted edits: capacity analysis and settings side by side.

    python -m bench.generator_fit --dataset counterfact --n-edits 1000 --work-dir W \\
        --variant linear:head_width=0,lr_schedule=constant --variant head:head_width=2048 --out OUT.json

The training pairs are the ones a MeG build makes (``meg.editor``): the edits are fitted (or their
fitted weights read from ``W/fit``, shared with ``bench.quality --work-dir W``), the conditions are
the encoder's embeddings of each prompt and its rewordings. Reported:

- the relative error ``||X - X_k|| / ||w - w0||`` of the best rank-k approximation X_k of the
  centred deltas, for several k: a denoiser whose output is a linear map of a width-W hidden state
  cannot do better than rank W;
- per variant (GeneratorConfig overrides, the defaults plus ``--set``): training seconds and steps,
  the error history, and the mean and 90th-percentile relative error of generated weights on every
  edit prompt (10 and 50 DDIM steps) and on one rewording per edit.

Variants run one after another in this process, on the same pairs and threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.quality import parse_settings, parse_variants
from meg import facts, fit, lm
from meg.generator import CONDITIONS
from meg.editor import MegConfig, encoder_for, generator_pairs, pseudo_pool, template_bank
from meg.generator import GeneratorConfig, WeightGenerator, relative_errors

RANKS = (64, 128, 256, 384, 512, 768)


def training_pairs(dataset: str, n_edits: int, work_dir: Path | None, model: str, condition: str | None = None):
    """(cond (M, C), rows (M,), weights (N, D), w0 (D,)) as a MeG build with the default settings makes them
    (``condition``: another ``MegConfig.generator_condition``)."""
    edits = facts.load_benchmark(dataset, "edit")[:n_edits]
    cfg = MegConfig(**({"generator_condition": condition} if condition else {}))
    loaded = lm.load_model(model)
    pool = pseudo_pool(edits)
    bank = template_bank(cfg, pool, edits)
    fitted = fit.fit_edits(loaded, edits, cfg.fit, store_dir=work_dir / "fit" if work_dir else None, bank=bank)
    encoder = encoder_for(cfg, pool)
    cond, rows = generator_pairs(cfg, edits, encoder, bank)
    return cond, torch.tensor(rows), fitted.weights, fitted.w0


def rank_errors(weights: torch.Tensor, w0: torch.Tensor) -> dict[int, float]:
    """Mean relative error of the best rank-k approximation of the centred deltas, per k."""
    delta = (weights - w0).double()
    centred = delta - delta.mean(0)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    out = {}
    for k in RANKS:
        if k >= s.numel():
            break
        approx = (u[:, :k] * s[:k]) @ vh[:k]
        out[k] = float(((centred - approx).norm(dim=1) / delta.norm(dim=1)).mean())
    return out


def run_variant(settings: dict, cond, rows, weights, w0) -> dict:
    cfg = GeneratorConfig(**settings)
    gen = WeightGenerator(cfg)
    t0 = time.perf_counter()
    history = gen.fit(cond, weights[rows], w0, progress=False)
    out = {"settings": settings, "train_seconds": round(time.perf_counter() - t0, 1), "steps": gen.steps_trained,
           "params": sum(p.numel() for p in gen.ema.parameters()),
           "history": [(h["step"], round(h["error"], 4)) for h in history]}
    n = weights.shape[0]
    for steps in (10, 50):
        err = relative_errors(gen.sample(cond[:n], steps=steps) - w0, weights - w0)
        out[f"prompt_error_{steps}"] = round(float(err.mean()), 4)
        out[f"prompt_error_{steps}_p90"] = round(float(err.quantile(0.9)), 4)
    first: dict[int, int] = {}
    for i in range(n, len(rows)):
        first.setdefault(int(rows[i]), i)
    if first:
        idx = torch.tensor(list(first.values()))
        err = relative_errors(gen.sample(cond[idx], steps=10) - w0, weights[rows[idx]] - w0)
        out["rewording_error_10"] = round(float(err.mean()), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    p.add_argument("--n-edits", type=int, default=1000)
    p.add_argument("--work-dir", type=Path, default=None, help="fitted weights are read from and kept in W/fit")
    p.add_argument("--model", default=lm.DEFAULT_MODEL)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="GeneratorConfig override for every variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                   help="a variant with these overrides (repeatable; none = the defaults alone)")
    p.add_argument("--condition", choices=CONDITIONS, default=None,
                   help="what the generator is conditioned on (default: MegConfig's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        common = {"eval_every": 250, **parse_settings(",".join(args.set), "--set")}
        variants = parse_variants(args.variant) or {"default": {}}
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    cond, rows, weights, w0 = training_pairs(args.dataset, args.n_edits, args.work_dir, args.model, args.condition)
    result = {"dataset": args.dataset, "n_edits": args.n_edits, "n_conditions": len(rows), "threads": args.threads,
              "condition": args.condition or MegConfig().generator_condition,
              "defaults": asdict(GeneratorConfig()), "rank_error": rank_errors(weights, w0), "variants": {}}
    print(f"rank-k relative error of the deltas: {result['rank_error']}", flush=True)
    for name, overrides in variants.items():
        res = run_variant({**common, **overrides}, cond, rows, weights, w0)
        result["variants"][name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "history"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
