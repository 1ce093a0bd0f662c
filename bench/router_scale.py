"""The router against the edit count: encoder and calibration settings compared on held-out pseudo-edits.

    python -m bench.router_scale --sizes 500,1000,2000 --variant pooled: \\
        --variant per-kind:router_options.negatives=per_kind --out router-scale.json \\
        --report-counterfact 1000,2000,4000,10000

No language model runs: only the encoder and the router, so a setting costs its encoder's training
and a calibration per size. For every variant (``name:key=value,...``, the keys of
``bench.quality --set``) and every size N:

- the router is built as a MeG build builds it (``encoder_for``, ``template_bank``,
  ``calibration_set``, ``fit_router``) for an edit set of N held-out pseudo-edits (``bench.devset``: pool records that
  neither train the encoder nor calibrate the router);
- their paraphrases, locality prompts and same-subject questions of another relation (template
  bank) are routed: the shares routed (paraphrases: to their own edit) and ``dev_score``, the
  harmonic mean of paraphrases routed right, locality prompts kept out and same-subject questions
  kept out. Settings are chosen on this score.

``--report-counterfact`` (``--report-zsre``) also routes the first 1,000 CounterFact (ZsRE) edits'
paraphrases and locality prompts with routers fitted on the first N edit prompts of that set: report
only (Gen and Loc of those runs are bounded by these shares), never a choice.

The relation check (``router_options.relation_check=true``) is compared as a variant like any
other setting; each row gives its calibrated ``relation_cut``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.quality import parse_settings, parse_variants
from meg import facts
from meg.augment import TemplateBank
from meg.editor import MegConfig, calibration_set, encoder_for, fit_router, pseudo_pool, template_bank, with_overrides


def harmonic(*values: float) -> float:
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def route_shares(router, encoder, edits: list, asked: int, bank) -> dict:
    """Shares (%) of the first ``asked`` edits' paraphrases (routed; routed to their own edit), locality
    prompts and same-subject questions of another relation routed by a router fitted on ``edits``."""
    out: dict = {}
    head = edits[:asked]
    para = [(i, e.paraphrases[0]) for i, e in enumerate(head) if e.paraphrases]
    loc = [e.locality[0].prompt for e in head if e.locality]
    same = [q for i, e in enumerate(head) if (q := bank.other_relation(e.prompt, e.subject, i))]
    own = torch.tensor([i for i, _ in para], dtype=torch.long)
    for name, qs in {"paraphrase": [q for _, q in para], "locality": loc, "same_subject": same}.items():
        if not qs:
            out[f"{name}_routed"] = 0.0
            continue
        mask, nearest, _ = router.route(encoder.encode(qs), qs, encoder.encode)
        out[f"{name}_routed"] = 100.0 * float(mask.float().mean())
        if name == "paraphrase":
            out["paraphrase_right"] = 100.0 * float((mask & (nearest == own)).float().mean())
    out.setdefault("paraphrase_right", 0.0)
    return out


def _row(name: str, label: str, cfg: MegConfig, encoder, edits: list, asked: int) -> dict:
    """Calibrate and fit a router for ``edits`` as a MeG build does, then route the first ``asked`` edits' questions."""
    pool = pseudo_pool(edits)
    t0 = time.time()
    router, cal = fit_router(cfg, encoder, edits, calibration_set(cfg, pool, template_bank(cfg, pool, edits)))
    # the bank of report questions is the pool's own (template_bank_of), as in the builds' router confusion
    shares = route_shares(router, encoder, edits, min(asked, len(edits)), TemplateBank.from_records(pool))
    return {"variant": name, "edits": label, "n": len(edits), "threshold": cal.threshold,
            "relation_cut": cal.relation_cut, "calibration_recall": cal.recall,
            "calibration_rejection": cal.rejection, "calibration_edit_recall": cal.edit_recall, **shares,
            "router_seconds": time.time() - t0}


def dev_score(shares: dict) -> float:
    return harmonic(shares["paraphrase_right"], 100 - shares["locality_routed"], 100 - shares["same_subject_routed"])


def measure(name: str, cfg: MegConfig, sizes: list[int], report: list[tuple[str, int]], asked: int) -> list[dict]:
    from bench.devset import held_out

    rows = []
    dev_all = held_out(max(sizes), cfg)
    t0 = time.time()
    encoder = encoder_for(cfg, pseudo_pool(dev_all), progress=True)
    encoder_seconds = time.time() - t0
    for n in sorted(sizes):
        row = _row(name, "pseudo", cfg, encoder, dev_all[:n], asked)
        row["dev_score"] = dev_score(row)
        row["encoder_seconds"] = encoder_seconds
        print(json.dumps(row), flush=True)
        rows.append(row)
    for dataset, n in report:
        row = _row(name, f"{dataset} (report only)", cfg, encoder, facts.load_benchmark(dataset, "edit")[:n], asked)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | edits | N | threshold | relation cut | paraphrases routed (right edit) | locality routed "
             "| same-subject routed | dev score |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['dev_score']:.1f}" if "dev_score" in r else ""
        cut = f"{r['relation_cut']:.3f}" if r.get("relation_cut") is not None else ""
        lines.append(f"| {r['variant']} | {r['edits']} | {r['n']:,} | {r['threshold']:.3f} | {cut} | "
                     f"{r['paraphrase_routed']:.1f} ({r['paraphrase_right']:.1f}) | {r['locality_routed']:.1f} | "
                     f"{r['same_subject_routed']:.1f} | {score} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,1000,2000", help="held-out pseudo-edit counts (comma-separated)")
    p.add_argument("--variant", action="append", default=[], help="name:key=value,... (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value for every variant")
    p.add_argument("--report-counterfact", default="", help="CounterFact edit counts to report (comma-separated)")
    p.add_argument("--report-zsre", default="", help="ZsRE edit counts to report (comma-separated)")
    p.add_argument("--asked", type=int, default=1000, help="questions of the first this many edits are routed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        base = with_overrides(MegConfig(), parse_settings(",".join(args.set), "--set"))
        variants = parse_variants(args.variant) or {"defaults": {}}
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    sizes = [int(x) for x in args.sizes.split(",") if x]
    report = [("counterfact", int(x)) for x in args.report_counterfact.split(",") if x]
    report += [("zsre", int(x)) for x in args.report_zsre.split(",") if x]
    rows: list[dict] = []
    for name, overrides in variants.items():
        rows += measure(name, with_overrides(base, overrides), sizes, report, args.asked)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
