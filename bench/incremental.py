"""Adding facts to a built model versus rebuilding it: time and Score, side by side in one run.

    python -m bench.incremental --n-base 100 --n-new 20 --out OUT.json
    python -m bench.incremental --n-base 1000 --n-new 100 --out OUT.json      # the full-size claim

Both arms use the pipeline's stage functions with the settings of ``--params`` (default: the
repository's params.yaml) and end with the same edit set: the first ``n_base`` CounterFact edit
records plus ``n_new`` later records added through the fact store (``meg facts add``).

- full rebuild: every stage from empty caches on the ``n_base + n_new`` facts (encoder training
  included, so the time is what a rebuild from nothing costs);
- incremental: the ``n_base``-fact model is built first (not timed); then the new facts are added
  and the stages rerun as ``dvc repro`` would rerun them: prepare (locality answers only for new
  prompts), fit (only the new edits; the rest come from the per-edit cache), the encoder only if the
  pseudo-edit pool changed, the router (recalibrated for the new count), the generator
  (warm-started from the previous one) and attach.

Both bundles are evaluated on all ``n_base + n_new`` edits with the same protocol and labels. The
report gives each stage's seconds, the time ratio incremental / full (also without the encoder,
which neither arm would retrain when only facts change), and the Score difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from meg import config, runner
from meg.data import restore_raw_data
from meg.factstore import FactStore

BUILD = ("prepare", "fit", "encoder", "router", "generator", "attach")


def _workspace(root: Path, params: dict, n_edits: int) -> Path:
    import yaml

    restore_raw_data(root / "data")
    p = json.loads(json.dumps(params))
    p["prepare"]["n_edits"] = n_edits
    p["evaluate"]["methods"] = []  # the bundle only: both arms are judged the same way
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return root


def _new_facts(root: Path, n_base: int, n_new: int) -> Path:
    """The n_new CounterFact facts after the first n_base (as the prepare stage reads the file, duplicates
    resolved) written as a user's fact file, with their probes for the evaluation."""
    from meg.stages.prepare import edit_set

    cfg = config.section_config(config.load_params(root / "params.yaml"), "prepare")
    following, _ = edit_set(config.PrepareConfig(**{**cfg.__dict__, "n_edits": n_base + n_new}), root)
    rows = []
    for e in following[n_base : n_base + n_new]:
        rows.append({"prompt": e.prompt, "target_new": e.target_new, "target_old": e.target_old,
                     "subject": e.subject, "paraphrases": list(e.paraphrases),
                     "locality": [{"prompt": p.prompt, "answer": p.answer} for p in e.locality]})
    path = root / "new-facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _add(root: Path, src: Path) -> dict:
    from meg.stages.prepare import edit_set

    cfg = config.section_config(config.load_params(root / "params.yaml"), "prepare")
    current, _ = edit_set(cfg, root)
    report = FactStore(root / cfg.data_dir / cfg.facts_dir).add(src, current)
    print(f"added {report.n_new} new facts ({report.n_override} overriding, {report.n_duplicate} duplicates)",
          flush=True)
    return {"new": report.n_new, "overriding": report.n_override, "duplicates": report.n_duplicate}


def _stage(root: Path, stage: str, times: dict, cpu: dict | None = None) -> None:
    """Run a stage; record its wall seconds (and its CPU seconds, which a busy machine inflates less)."""
    t0 = time.perf_counter()
    result = runner.run_stage(stage, root / "params.yaml", root, progress=False)
    times[stage] = time.perf_counter() - t0
    if cpu is not None:
        cpu[stage] = result.metrics["cpu_seconds"]


def _seed_fit_cache(src: Path, dst: Path) -> int:
    """Copy into ``dst``'s per-edit fit cache the fits ``src`` holds for ``dst``'s prepared edits.

    The base build of the incremental arm is not timed; its edits are a subset of the full arm's,
    fitted there with the same settings, so it takes them instead of fitting them again. Only the
    base edits are copied: the new facts stay unfitted for the timed incremental fit.
    """
    from meg import fit
    from meg.stages.common import read_edits

    wanted = {e.content_key for e in read_edits(dst / "artifacts" / "prepare" / "edits.jsonl")}
    copied = 0
    for store_dir in sorted((src / "cache" / "fit").glob("*")):
        # store keys are the content key and a hash of the texts fitted (meg.fit.store_key)
        copied += fit.WeightStore(store_dir).export(dst / "cache" / "fit" / store_dir.name,
                                                    lambda key: key.split("-")[0] in wanted)
    return copied


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _score(root: Path) -> dict:
    runner.run_stage("evaluate", root / "params.yaml", root, progress=False)
    return json.loads((root / "artifacts" / "evaluate" / "metrics.json").read_text())["meg"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-base", type=int, default=100)
    p.add_argument("--n-new", type=int, default=20)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--workdir", type=Path, default=None, help="kept for inspection when given")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.n_base < 1 or args.n_new < 1:
        p.error("--n-base and --n-new must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["MEG_TRACKING"] = "off"
    params = config.load_params(args.params)
    work = args.workdir or Path(f"/tmp/meg-bench-incremental-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)

    # full rebuild: every stage from empty caches, on all the facts
    full = _workspace(work / "full", params, args.n_base)
    _add(full, _new_facts(full, args.n_base, args.n_new))
    full_times: dict[str, float] = {}
    full_cpu: dict[str, float] = {}
    for stage in BUILD:
        _stage(full, stage, full_times, full_cpu)
    full_metrics = _score(full)

    # incremental: the n_base model first, untimed (its encoder and its edits' fits taken from the full
    # arm: same pool, same settings)
    inc = _workspace(work / "incremental", params, args.n_base)
    shutil.copytree(full / "cache" / "encoders", inc / "cache" / "encoders")
    setup: dict[str, float] = {}
    _stage(inc, "prepare", setup)
    print(f"base build: {_seed_fit_cache(full, inc)} fits taken from the full arm", flush=True)
    for stage in BUILD[1:]:
        _stage(inc, stage, setup)
    pool_before = _digest(inc / "artifacts" / "prepare" / "pseudo.jsonl")
    added = _add(inc, _new_facts(inc, args.n_base, args.n_new))
    inc_times: dict[str, float] = {}
    inc_cpu: dict[str, float] = {}
    _stage(inc, "prepare", inc_times, inc_cpu)
    encoder_reruns = _digest(inc / "artifacts" / "prepare" / "pseudo.jsonl") != pool_before
    for stage in ("fit", "encoder", "router", "generator", "attach"):
        if stage != "encoder" or encoder_reruns:
            _stage(inc, stage, inc_times, inc_cpu)
    inc_metrics = _score(inc)
    gen_report = json.loads((inc / "artifacts" / "generator" / "report.json").read_text())
    fit_metrics = json.loads((inc / "artifacts" / "fit" / "metrics.json").read_text())

    total_full, total_inc = sum(full_times.values()), sum(inc_times.values())
    no_enc_full = total_full - full_times["encoder"]
    no_enc_inc = total_inc - inc_times.get("encoder", 0.0)
    result = {
        "n_base": args.n_base, "n_new": args.n_new, "added": added, "model": params["base"]["model"],
        "threads": torch.get_num_threads(),
        "full_seconds": full_times, "incremental_seconds": inc_times, "base_build_seconds": setup,
        "full_cpu_seconds": full_cpu, "incremental_cpu_seconds": inc_cpu,
        "time_ratio": total_inc / total_full, "time_ratio_without_encoder": no_enc_inc / no_enc_full,
        "cpu_ratio": sum(inc_cpu.values()) / sum(full_cpu.values()),
        "cpu_ratio_without_encoder": (sum(inc_cpu.values()) - inc_cpu.get("encoder", 0.0))
        / (sum(full_cpu.values()) - full_cpu["encoder"]),
        "score_full": full_metrics["score"], "score_incremental": inc_metrics["score"],
        "score_difference": inc_metrics["score"] - full_metrics["score"],
        "metrics_full": full_metrics, "metrics_incremental": inc_metrics,
        "incremental_fitted": fit_metrics["n_fitted"], "incremental_cached": fit_metrics["n_cached"],
        "generator_warm_start": gen_report["warm_start"], "generator_steps_incremental": gen_report["steps"],
        "encoder_rerun": encoder_reruns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{'stage':<10} {'full s':>8} {'(CPU s)':>8} {'incremental s':>14} {'(CPU s)':>8}")
    for stage in BUILD:
        print(f"{stage:<10} {full_times[stage]:>8.1f} {full_cpu[stage]:>8.1f} {inc_times.get(stage, 0.0):>14.1f} "
              f"{inc_cpu.get(stage, 0.0):>8.1f}")
    print(f"{'total':<10} {total_full:>8.1f} {sum(full_cpu.values()):>8.1f} {total_inc:>14.1f} "
          f"{sum(inc_cpu.values()):>8.1f}")
    print(f"time ratio incremental/full: {result['time_ratio']:.3f} wall, {result['cpu_ratio']:.3f} CPU "
          f"({result['time_ratio_without_encoder']:.3f} / {result['cpu_ratio_without_encoder']:.3f} without the encoder)")
    print(f"Score: full {full_metrics['score']:.2f}, incremental {inc_metrics['score']:.2f} "
          f"(difference {result['score_difference']:+.2f}); fitted {fit_metrics['n_fitted']:.0f} new edits, "
          f"generator warm-started: {gen_report['warm_start']} ({gen_report['steps']} steps)")
    print(f"results: {args.out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
