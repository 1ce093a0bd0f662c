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

``--relation-check WORD,...`` measures a relation check the router could add after routing: a routed
question that names its nearest edit's subject is compared with that edit's prompt, both with the
subject replaced by WORD, and is sent back to the unedited model when the cosine of the two
embeddings is below a cut. The cut keeps a share (99, 98, 95%) of the right-routed held-out
paraphrases that name their subject, and is taken on the largest held-out size of the variant; the
report rows apply that cut. Each row gets, per word and share, the shares routed after the check.
"""

from __future__ import annotations

import argparse
import json
import re
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


KEEP = (0.99, 0.98, 0.95)  # shares of the right-routed paraphrases a relation-check cut keeps


def without_subject(text: str, subject: str | None, word: str) -> str | None:
    """``text`` with every case-folded occurrence of ``subject`` replaced by ``word``; None if it names none."""
    if not subject:
        return None
    pattern = re.compile(re.escape(subject), re.IGNORECASE)
    return pattern.sub(word, text) if pattern.search(text) else None


def relation_cosines(encoder, edits: list, texts: list[str], routed: torch.Tensor, nearest: torch.Tensor,
                     word: str) -> torch.Tensor:
    """(M,) cosine of each routed text and its nearest edit's prompt, the subject replaced by ``word`` in both;
    NaN where the text is not routed or does not name that subject (the check cannot apply)."""
    out = torch.full((len(texts),), float("nan"))
    pairs = [(k, q, p) for k, (text, hit, j) in enumerate(zip(texts, routed.tolist(), nearest.tolist())) if hit
             and (q := without_subject(text, edits[j].subject, word))
             and (p := without_subject(edits[j].prompt, edits[j].subject, word))]
    if pairs:
        a, b = encoder.encode([q for _, q, _ in pairs]), encoder.encode([p for _, _, p in pairs])
        out[torch.tensor([k for k, _, _ in pairs])] = (a * b).sum(1)
    return out


def keep_cut(cosines: torch.Tensor, keep: float) -> float:
    """The cut below which a share 1 - ``keep`` of the (non-NaN) cosines lies."""
    c = cosines[~cosines.isnan()]
    return float(torch.quantile(c, 1 - keep)) if c.numel() else float("-inf")


def route_shares(router, encoder, edits: list, asked: int, bank, words: tuple[str, ...] = (),
                 cuts: dict[str, dict[float, float]] | None = None) -> dict:
    """Shares (%) of the first ``asked`` edits' paraphrases (routed; routed to their own edit), locality
    prompts and same-subject questions of another relation routed by a router fitted on ``edits``.

    With ``words``, also the shares routed after a relation check with each word and each cut: the
    cuts given in ``cuts[word][keep]``, or else those that keep ``keep`` of these right-routed
    paraphrases naming their subject (returned under ``relation_check``)."""
    out: dict = {}
    head = edits[:asked]
    para = [(i, e.paraphrases[0]) for i, e in enumerate(head) if e.paraphrases]
    loc = [e.locality[0].prompt for e in head if e.locality]
    same = [q for i, e in enumerate(head) if (q := bank.other_relation(e.prompt, e.subject, i))]
    own = torch.tensor([i for i, _ in para], dtype=torch.long)
    kinds = {"paraphrase": [q for _, q in para], "locality": loc, "same_subject": same}
    routed = {}
    for name, qs in kinds.items():
        if qs:
            mask, nearest, _ = router.route(encoder.encode(qs), qs)
        else:
            mask, nearest = torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
        routed[name] = (mask, nearest)
        out[f"{name}_routed"] = 100.0 * float(mask.float().mean()) if qs else 0.0
    right = routed["paraphrase"][0] & (routed["paraphrase"][1] == own)
    out["paraphrase_right"] = 100.0 * float(right.float().mean()) if para else 0.0
    if words:
        out["relation_check"] = {}
    for word in words:
        cos = {name: relation_cosines(encoder, edits, kinds[name], *routed[name], word) for name in kinds}
        para_cos = torch.where(right, cos["paraphrase"], torch.tensor(float("nan")))
        rows = {}
        for keep in KEEP:
            cut = cuts[word][keep] if cuts else keep_cut(para_cos, keep)
            after = {"cut": cut, "paraphrase_right_named": int((~para_cos.isnan()).sum())}
            for name in kinds:
                mask = routed[name][0]
                dropped = mask & ~cos[name].isnan() & (cos[name] < cut)
                share = (right if name == "paraphrase" else mask) & ~dropped
                key = "paraphrase_right" if name == "paraphrase" else f"{name}_routed"
                after[key] = 100.0 * float(share.float().mean()) if len(kinds[name]) else 0.0
                after[f"{name}_named"] = int((~cos[name].isnan()).sum())
            rows[str(keep)] = after
        out["relation_check"][word] = rows
    return out


def _row(name: str, label: str, cfg: MegConfig, encoder, edits: list, asked: int, words: tuple[str, ...] = (),
         cuts: dict | None = None) -> dict:
    """Calibrate and fit a router for ``edits`` as a MeG build does, then route the first ``asked`` edits' questions."""
    pool = pseudo_pool(edits)
    t0 = time.time()
    router, cal = fit_router(cfg, encoder, edits, calibration_set(cfg, pool, template_bank(cfg, pool, edits)))
    # the bank of report questions is the pool's own (template_bank_of), as in the builds' router confusion
    shares = route_shares(router, encoder, edits, min(asked, len(edits)), TemplateBank.from_records(pool), words, cuts)
    return {"variant": name, "edits": label, "n": len(edits), "threshold": cal.threshold,
            "calibration_recall": cal.recall, "calibration_rejection": cal.rejection, **shares,
            "router_seconds": time.time() - t0}


def dev_score(shares: dict) -> float:
    return harmonic(shares["paraphrase_right"], 100 - shares["locality_routed"], 100 - shares["same_subject_routed"])


def measure(name: str, cfg: MegConfig, sizes: list[int], report: list[tuple[str, int]], asked: int,
            words: tuple[str, ...] = ()) -> list[dict]:
    from bench.devset import held_out

    rows = []
    dev_all = held_out(max(sizes), cfg)
    t0 = time.time()
    encoder = encoder_for(cfg, pseudo_pool(dev_all), progress=True)
    encoder_seconds = time.time() - t0
    for n in sorted(sizes):
        row = _row(name, "pseudo", cfg, encoder, dev_all[:n], asked, words)
        row["dev_score"] = dev_score(row)
        for after in row.get("relation_check", {}).values():
            for shares in after.values():
                shares["dev_score"] = dev_score(shares)
        row["encoder_seconds"] = encoder_seconds
        print(json.dumps(row), flush=True)
        rows.append(row)
    # the report rows take the cuts of the largest held-out size
    cuts = {w: {keep: rows[-1]["relation_check"][w][str(keep)]["cut"] for keep in KEEP} for w in words}
    for dataset, n in report:
        row = _row(name, f"{dataset} (report only)", cfg, encoder, facts.load_benchmark(dataset, "edit")[:n], asked,
                   words, cuts)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | edits | N | threshold | paraphrases routed (right edit) | locality routed "
             "| same-subject routed | dev score |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        score = f"{r['dev_score']:.1f}" if "dev_score" in r else ""
        lines.append(f"| {r['variant']} | {r['edits']} | {r['n']:,} | {r['threshold']:.3f} | "
                     f"{r['paraphrase_routed']:.1f} ({r['paraphrase_right']:.1f}) | {r['locality_routed']:.1f} | "
                     f"{r['same_subject_routed']:.1f} | {score} |")
    return "\n".join(lines)


def relation_table(rows: list[dict]) -> str:
    """Shares routed before and after the relation check, per word and kept share of paraphrases."""
    lines = ["| variant | edits | N | check | cut | paraphrases routed right | locality routed | same-subject routed "
             "| dev score |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "relation_check" not in r:
            continue
        score = f"{r['dev_score']:.1f}" if "dev_score" in r else ""
        lines.append(f"| {r['variant']} | {r['edits']} | {r['n']:,} | none | | {r['paraphrase_right']:.1f} | "
                     f"{r['locality_routed']:.1f} | {r['same_subject_routed']:.1f} | {score} |")
        for word, after in r["relation_check"].items():
            for keep, a in after.items():
                score = f"{a['dev_score']:.1f}" if "dev_score" in a else ""
                lines.append(f"| | | | '{word}', keep {float(keep):.0%} | {a['cut']:.3f} | {a['paraphrase_right']:.1f} | "
                             f"{a['locality_routed']:.1f} | {a['same_subject_routed']:.1f} | {score} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="500,1000,2000", help="held-out pseudo-edit counts (comma-separated)")
    p.add_argument("--variant", action="append", default=[], help="name:key=value,... (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value for every variant")
    p.add_argument("--report-counterfact", default="", help="CounterFact edit counts to report (comma-separated)")
    p.add_argument("--report-zsre", default="", help="ZsRE edit counts to report (comma-separated)")
    p.add_argument("--asked", type=int, default=1000, help="questions of the first this many edits are routed")
    p.add_argument("--relation-check", default="", metavar="WORD,...",
                   help="measure a relation check with the subject replaced by each word (comma-separated)")
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
    words = tuple(w.strip() for w in args.relation_check.split(",") if w.strip())
    rows: list[dict] = []
    for name, overrides in variants.items():
        rows += measure(name, with_overrides(base, overrides), sizes, report, args.asked, words)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if words:
        print(relation_table(rows))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
