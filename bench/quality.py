"""Editing quality side by side: every method on the same model, edits and metrics.

    python -m bench.quality --dataset counterfact --n-edits 256 --methods none,ft --out OUT.json
    python -m bench.quality --facts my_facts.jsonl --methods none,ft,meg --out OUT.json

Edits are applied as one batch, then every edit is evaluated (see meg.evaluate for the protocol).
Writes OUT.json ({"model", "dataset", "n_edits", "methods": {NAME: metrics}}, percentages 0-100),
the per-edit outputs beside it (OUT.records.jsonl) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.peak import PeakRSS
from meg import evaluate, facts, lm
from meg.editors import EDITORS, make_editor

COLUMNS = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score", "es", "ps", "ns",
           "edit_seconds", "eval_seconds", "peak_rss_mb")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["counterfact", "zsre"])
    src.add_argument("--facts", type=Path, help="any fact file the readers accept")
    p.add_argument("--n-edits", type=int, default=256, help="the first N edits of the set")
    p.add_argument("--methods", default="none,ft", help=f"comma-separated, from {','.join(EDITORS)}")
    p.add_argument("--model", default=lm.DEFAULT_MODEL)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for m in args.methods.split(","):
        if m not in EDITORS:
            p.error(f"unknown method {m!r}; choose from {', '.join(EDITORS)}")
    if args.n_edits < 1:
        p.error("--n-edits must be >= 1")
    return args


def load_edits(args: argparse.Namespace) -> tuple[str, list]:
    if args.dataset:
        edits = facts.load_benchmark(args.dataset, "edit")
        name = args.dataset
    else:
        edits = facts.read_facts(args.facts)
        name = str(args.facts)
    return name, edits[: args.n_edits]


def print_table(result: dict) -> None:
    head = f"{'method':<8}" + "".join(f"{c:>9}" for c in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag",
                                                          "loc_tf", "score", "es", "ps", "ns", "edit_s", "eval_s", "rss_mb"))
    print(head)
    for name, m in result["methods"].items():
        cells = [m.get(c) for c in COLUMNS]
        print(f"{name:<8}" + "".join(f"{'-':>9}" if v is None else f"{v:>9.1f}" for v in cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, edits = load_edits(args)
    loaded = lm.load_model(args.model)
    print(f"bench.quality: {len(edits)} edits from {dataset}, model {loaded.model_id}", flush=True)
    base = evaluate.EditedLM(loaded, batch_size=args.batch_size)
    t0 = time.time()
    labels = evaluate.locality_labels(base, edits)
    print(f"locality labels from the pre-edit model: {time.time() - t0:.1f} s", flush=True)
    result = {"model": loaded.model_id, "model_hash": loaded.content_hash, "dataset": dataset,
              "n_edits": len(edits), "methods": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records_path = args.out.with_suffix(".records.jsonl")
    records_path.write_text("")
    for name in args.methods.split(","):
        editor = make_editor(name)
        with PeakRSS() as peak:
            t0 = time.time()
            edited = editor.apply(loaded, edits)
            edited.batch_size = args.batch_size
            edit_seconds = time.time() - t0
            try:
                res = evaluate.evaluate(edited, edits, labels)
            finally:
                edited.close()
        metrics = dict(res.metrics)
        metrics.update(edit_seconds=edit_seconds, eval_seconds=res.seconds, peak_rss_mb=peak.peak_mb)
        metrics.update(getattr(edited, "extra_metrics", {}) or {})
        result["methods"][name] = metrics
        with open(records_path, "a") as f:
            for r in res.records:
                f.write(json.dumps({"method": name, **r}) + "\n")
        print(f"{name}: score {metrics['score']:.1f} (edit {edit_seconds:.1f} s, eval {res.seconds:.1f} s)", flush=True)
        args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"results: {args.out}  per-edit outputs: {records_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
