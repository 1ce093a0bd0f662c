"""Weight generator speed and accuracy on synthetic edits that resemble the real problem.

    python -m bench.generator_speed --denoiser dit --out /tmp/gen_dit.json
    python -m bench.generator_speed --denoiser mlp --set width=512 --set lr=2e-3

Data: N edits with random unit conditions c (C = 384) and weights w = w0 + f(c) + noise, where f
is a fixed random two-layer tanh network with uneven output scales per coordinate, scaled so that
||w - w0|| is about 7 on average (D = 1153, SmolLM2's neuron). Perturbed conditions have cosine
0.9 to the originals.

Reports: training time until the early-stop target (or max_steps), the relative L2 error
||w_gen - w|| / ||w - w0|| on all training conditions, on perturbed conditions (against the edit's
own weights and against f at the perturbed condition), and sampling time per query for 10 and 50
DDIM steps at batch 1 and 64. With --warm-from N0, the N-edit run warm-starts from a generator
trained on the first N0 edits (edits added later). Prints one JSON document (also written to --out).

OpenMP's busy-waiting turns a machine shared with other jobs into a 10x slowdown at 2 threads, so
the script asks for passive waiting unless OMP_WAIT_POLICY is already set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from meg.generator import GeneratorConfig, WeightGenerator, relative_errors


def synthetic_edits(n: int, cond_dim: int = 384, dim: int = 1153, hidden: int = 256, delta_norm: float = 7.0,
                    noise: float = 0.02, seed: int = 0):
    """(cond (N, C), w (N, D), w0 (D,), f) with w = w0 + f(cond) + small noise."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(cond_dim, hidden, generator=g) * 1.5  # unit c -> pre-activations of std 1.5
    b1 = torch.randn(hidden, generator=g) * 0.5  # gives f a shared (mean) component
    w2 = torch.randn(hidden, dim, generator=g)
    col_scale = torch.exp(0.5 * torch.randn(dim, generator=g))  # k, v, b coordinates differ in scale
    w0 = torch.randn(dim, generator=g) * 0.05
    cond = F.normalize(torch.randn(n, cond_dim, generator=g), dim=1)
    raw = (torch.tanh(cond @ w1 + b1) @ w2) * col_scale
    gain = delta_norm / raw.norm(dim=1).mean()

    def f(c: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(c @ w1 + b1) @ w2) * col_scale * gain

    eps = torch.randn(n, dim, generator=g) * noise * delta_norm / dim**0.5
    return cond, w0 + f(cond) + eps, w0, f


def perturb(cond: torch.Tensor, cosine: float, seed: int = 1) -> torch.Tensor:
    """Unit vectors at exactly `cosine` to each row of `cond` (random orthogonal direction)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(cond.shape, generator=g)
    u = F.normalize(u - (u * cond).sum(1, keepdim=True) * cond, dim=1)
    return cosine * cond + (1 - cosine**2) ** 0.5 * u


def sampling_seconds(gen: WeightGenerator, cond: torch.Tensor, steps: int, batch: int, repeats: int = 3) -> float:
    """Median wall time per query."""
    times = []
    for r in range(repeats):
        rows = cond[r * batch: (r + 1) * batch]
        t0 = time.perf_counter()
        gen.sample(rows, steps=steps, sampler="ddim")
        times.append((time.perf_counter() - t0) / rows.shape[0])
    return statistics.median(times)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--denoiser", choices=["dit", "mlp"], default="dit")
    p.add_argument("--size", default="s", help="a size preset of meg.generator.PRESETS (\"s\" = the defaults)")
    p.add_argument("--n", type=int, default=1000, help="number of edits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="GeneratorConfig override")
    p.add_argument("--warm-from", type=int, default=0, metavar="N0",
                   help="first train on the first N0 edits, then warm-start the N-edit run from that generator")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    overrides["denoiser"] = args.denoiser
    cfg = GeneratorConfig.from_preset(args.size, **overrides) if args.size else GeneratorConfig(**overrides)
    cond, w, w0, f = synthetic_edits(args.n)
    near = perturb(cond, 0.9)

    init_from, warm = None, {}
    if args.warm_from:
        init_from = WeightGenerator(cfg)
        t0 = time.perf_counter()
        init_from.fit(cond[: args.warm_from], w[: args.warm_from], w0, progress=args.progress)
        warm = {"warm_from": args.warm_from, "warm_from_steps": init_from.steps_trained,
                "warm_from_seconds": round(time.perf_counter() - t0, 1)}
    gen = WeightGenerator(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    history = gen.fit(cond, w, w0, progress=args.progress, init_from=init_from)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_params = sum(p.numel() for p in gen.ema.parameters())

    delta = w - w0
    result = {
        "config": asdict(cfg), "n_edits": args.n, "threads": args.threads, "params": n_params, **warm,
        "steps": gen.steps_trained, "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
        "reached_target": any(h["error"] < cfg.target_error for h in history if not h.get("final")),
        "history": history,
    }
    for steps in (10, 50):
        err_train = relative_errors(gen.sample(cond, steps=steps) - w0, delta)
        w_near = gen.sample(near, steps=steps)
        result[f"error_train_{steps}"] = float(err_train.mean())
        result[f"error_train_max_{steps}"] = float(err_train.max())
        result[f"error_near_vs_edit_{steps}"] = float(relative_errors(w_near - w0, delta).mean())
        result[f"error_near_vs_f_{steps}"] = float(relative_errors(w_near - w0, f(near)).mean())
    # how far the true map itself moves between c and the perturbed condition
    result["f_shift_near"] = float(relative_errors(f(near), delta).mean())
    for steps in (10, 50):
        for batch in (1, 64):
            result[f"sample_ms_per_query_{steps}steps_b{batch}"] = 1e3 * sampling_seconds(gen, cond, steps, batch)

    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    summary = {k: v for k, v in result.items() if k not in ("config", "history")}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
