"""Where a build's router sends the evaluated questions, without fitting a neuron or generating a token.

    python -m bench.devset --n 500 --out dev.jsonl
    python -m bench.routing --facts dev.jsonl --n-edits 500 --out routing.jsonl
    python -m bench.routing --facts dev.jsonl --n-edits 500 --set router_options.question_view=0 --out routing.jsonl

The build's own steps run (blocklist, pseudo-edits with their rewordings, the query encoder, which is
cached, and the router calibrated on the pseudo-edits); then each edit's first paraphrase and first
locality prompt are routed. A paraphrase the router does not send to its own edit cannot get the
new target, so the share routed is a ceiling on generality; a locality prompt that is routed gets
some edit's neuron. Paraphrases asked after other context (a sentence before the one naming the
subject) are counted apart. One JSON line per run is appended to ``--out``; choose settings on
held-out pseudo-edits (``bench.devset``), never on the edits that are evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bench import quality
from meg import facts, lm
from meg.editor import MegConfig, build_data, calibration_set, encoder_for, fit_router, leading_context, with_overrides
from meg.errors import ConfigError


def summary(edits: list, paraphrase, locality, n_locality: int) -> dict:
    """Shares (0-1) from the ``Routing`` of the edits' first paraphrases and of their ``n_locality`` locality prompts."""
    n = len(edits)
    own = (paraphrase.mask & (paraphrase.nearest == torch.arange(n))).tolist()
    after = [bool(leading_context(e.paraphrases[0], e.subject)) for e in edits]
    n_after = sum(after)

    def share(rows: list[bool], of: list[bool]) -> float | None:
        picked = [r for r, o in zip(rows, of) if o]
        return sum(picked) / len(picked) if picked else None

    return {
        "n_edits": n,
        "paraphrase_routed_own": sum(own) / n if n else None,
        "paraphrase_routed_other": float((paraphrase.mask & (paraphrase.nearest != torch.arange(n))).float().mean())
        if n else None,
        "n_after_context": n_after,
        "after_context_routed_own": share(own, after),
        "plain_routed_own": share(own, [not a for a in after]),
        "missed_because": dict(Counter(r for r, o in zip(paraphrase.reason, own) if not o)),
        "n_locality": n_locality,
        "locality_routed": float(locality.mask.float().mean()) if n_locality else None,
    }


def parse_settings(items: list[str]) -> dict:
    """``["router_options.question_view=0.5", ...]`` -> overrides, each parsed as ``bench.quality`` parses settings
    (JSON where it parses, else the string)."""
    out = {}
    for item in items:
        try:
            out.update(quality.parse_settings(item, "--set"))
        except argparse.ArgumentTypeError as e:
            raise ConfigError(str(e)) from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--facts", type=Path, help="any fact file the readers accept")
    src.add_argument("--dataset", choices=("counterfact", "zsre"), help="a benchmark's edit split")
    ap.add_argument("--n-edits", type=int, default=1000)
    ap.add_argument("--model", default=lm.DEFAULT_MODEL)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a MeG setting (repeatable)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines file; one line per run is appended")
    args = ap.parse_args(argv)
    try:
        overrides = parse_settings(args.set)
        cfg = with_overrides(MegConfig(), overrides) if overrides else MegConfig()
        if cfg.router == "off":
            raise ConfigError("bench.routing: the router is off, every question is routed")
        edits = facts.load_benchmark(args.dataset, "edit") if args.dataset else facts.read_facts(args.facts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    edits = [e for e in edits[: args.n_edits] if e.paraphrases]
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = lm.load_model(args.model)
    t0 = time.time()
    data = build_data(loaded, edits, cfg, progress=False)
    encoder = encoder_for(cfg, data.pool)
    router, calibration = fit_router(cfg, encoder, edits, calibration_set(cfg, data.pool, data.bank))
    paras = [e.paraphrases[0] for e in edits]
    locs = [e.locality[0].prompt for e in edits if e.locality]
    result = {
        "source": args.dataset or str(args.facts), "settings": overrides, "build_seconds": round(time.time() - t0, 1),
        "threshold": calibration.threshold, "relation_cut": calibration.relation_cut,
        "calibration_recall": calibration.recall, "calibration_rejection": calibration.rejection,
        "same_subject_routed": calibration.confusion.get("same_subject_routed"),
        **summary(edits, router.route_detail(encoder.encode(paras), paras, encoder.encode),
                  router.route_detail(encoder.encode(locs), locs, encoder.encode), len(locs)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
