"""Locality split by what a locality prompt asks about, given the whole edit set.

    python -m bench.locality_split --dataset counterfact --n-edits 10000 \
        --records docs/results/counterfact-10000-meg-hardneg.records.jsonl.gz --out SPLIT.json

A benchmark's locality prompt is scored against the base model's answer. In a large edit set that
answer can itself be edited: CounterFact's neighbourhood prompts ask the edit's relation about other
subjects, and at 10,000 edits some of those subjects are edited too. Each evaluated locality prompt
falls into one group, by the edits of the set (all of them, not only the evaluated ones) whose
subject it names (``meg.subject_gate.SubjectIndex``, whole words, case-folded):

- ``changed``: a named edit's old target is the prompt's expected answer, so that edit rewrites the
  very fact the prompt asks ("Taipei is a twin city of" -> Warsaw, while the set edits Taipei's
  twin city to Moscow). Keeping the base answer here contradicts the edit set; the share that
  answers with a named edit's new target is reported as ``new_target``;
- ``same_subject``: it names an edited subject but asks another fact of it: the base answer is
  right, and an edit's neuron answering it is the same-subject confusion;
- ``clean``: it names no edited subject.

This reads evaluation prompts, so it is an analysis of results, never an input of a build.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import sys

from bench import records
from meg.facts import normalise_prompt
from meg.subject_gate import SubjectIndex

GROUPS = ("clean", "same_subject", "changed")


def classify(edits: list, evaluated_ids: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{edit id: (group, new targets of the named edits that rewrite the fact)} for the first
    locality prompt of every evaluated edit that has one."""
    index = SubjectIndex([e.subject for e in edits])
    by_id = {e.id: i for i, e in enumerate(edits)}
    out = {}
    for rid in evaluated_ids:
        if rid not in by_id or not edits[by_id[rid]].locality:
            continue
        i = by_id[rid]
        probe = edits[i].locality[0]
        named = [j for j in index.matches(probe.prompt) if j != i]
        answer = normalise_prompt(probe.answer or "")
        rewrite = [edits[j].target_new for j in named
                   if answer and normalise_prompt(edits[j].target_old or "") == answer]
        out[rid] = ("changed" if rewrite else "same_subject" if named else "clean", rewrite)
    return out


def split(groups: dict[str, tuple[str, list[str]]], rows: list[dict]) -> dict:
    """{method: {group: {"n", "loc_ag", "loc_tf", "routed", ["new_target"]}}}, and "all"."""
    acc: dict = {}
    for r in rows:
        if r["id"] not in groups:
            continue
        group, rewrite = groups[r["id"]]
        out = normalise_prompt(r.get("loc_out") or "")
        new = any(out.startswith(normalise_prompt(t)) for t in rewrite)
        for g in (group, "all"):
            s = acc.setdefault(r["method"], {}).setdefault(g, [0, 0, 0.0, 0, 0])
            s[0] += 1
            s[1] += bool(r["loc_ag"])
            s[2] += float(r["loc_tf"])
            s[3] += bool(r.get("loc_routed", False))
            s[4] += new
    result = {}
    for method, gs in acc.items():
        result[method] = {}
        for g, (n, ag, tf, routed, new) in gs.items():
            row = {"n": n, "loc_ag": round(100 * ag / n, 1), "loc_tf": round(100 * tf / n, 1),
                   "routed": round(100 * routed / n, 1)}
            if g == "changed":
                row["new_target"] = round(100 * new / n, 1)
            result[method][g] = row
    return result


def table(result: dict) -> str:
    lines = ["| method | locality prompts | n | Loc AG | Loc TF | routed to an edit | answers the rewriting edit's target |",
             "|---|---|---|---|---|---|---|"]
    for method, gs in result.items():
        for g in (*GROUPS, "all"):
            if g in gs:
                s = gs[g]
                new = f"{s['new_target']:.1f}" if "new_target" in s else ""
                lines.append(f"| {method} | {g} | {s['n']:,} | {s['loc_ag']:.1f} | {s['loc_tf']:.1f} | "
                             f"{s['routed']:.1f} | {new} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = records.parser(__doc__.splitlines()[0], records_required=True).parse_args(argv)
    edits = records.edit_set(args)
    rows = records.labelled_rows([records.labelled(r) for r in args.records], ("loc_ag", "loc_tf"))
    groups = classify(edits, list(dict.fromkeys(r["id"] for r in rows)))
    result = {"source": args.dataset or str(args.facts), "n_edits": len(edits),
              "groups": {g: sum(1 for k, _ in groups.values() if k == g) for g in GROUPS},
              "methods": split(groups, rows)}
    print(table(result["methods"]))
    records.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
