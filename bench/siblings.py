"""Contradicting siblings in an edit set, and how a method's generality splits over them.

    python -m bench.siblings --dataset zsre --n-edits 1037 --records OUT.records.jsonl.gz --out SIB.json
    python -m bench.siblings --dataset zsre --n-edits 1037 --records before=A.records.jsonl.gz \
        --records after=B.records.jsonl.gz --out SIB.json

Two edits are *contradicting siblings* when they share a subject and differ in their new target
("What company made USS Leedstown?" -> A, "Which corporation created USS Leedstown?" -> B). For
such an edit, a paraphrase is *ambiguous* when it is at least as close to a sibling's prompt as to
its own prompt under the base sentence encoder (all-MiniLM-L6-v2 as shipped, not the tuned one), or
is a sibling's prompt word for word: any router that sends a question to the edit it most resembles
then answers it with the sibling's target, and a method that answers it with the edit's own target
contradicts the sibling's fact.

This reads the evaluation paraphrases, so it is an analysis of results, never an input of a build.
With ``--records`` (per-edit outputs of ``bench.quality``, repeatable), Rel / Gen AG of every method
are given separately for edits without a sibling, with a sibling, and with an ambiguous paraphrase.
``--records LABEL=PATH`` names the methods of that file LABEL (one method) or LABEL/METHOD (several),
so runs of the same method can stand side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first torch import

import sys
from collections import defaultdict
from pathlib import Path

import torch

from bench import records
from bench.records import labelled_rows
from meg.facts import normalise_prompt
from meg.editor import MegConfig, base_encoder


def classify(edits: list, encode) -> list[str]:
    """Per edit: "alone" (no contradicting sibling), "sibling" or "ambiguous" (see the module doc)."""
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(edits):
        if e.subject:
            by_subject[normalise_prompt(e.subject)].append(i)
    targets = [normalise_prompt(e.target_new) for e in edits]
    siblings = [[j for j in by_subject.get(normalise_prompt(e.subject or ""), [])
                 if j != i and targets[j] != targets[i]] for i, e in enumerate(edits)]
    need = [i for i, s in enumerate(siblings) if s and edits[i].paraphrases]
    prompts = torch.nn.functional.normalize(encode([e.prompt for e in edits]), dim=1)
    para = torch.nn.functional.normalize(encode([edits[i].paraphrases[0] for i in need]), dim=1) if need else None
    kind = ["sibling" if s else "alone" for s in siblings]
    for row, i in enumerate(need):
        p = edits[i].paraphrases[0]
        own = float(para[row] @ prompts[i])
        near = max(float(para[row] @ prompts[j]) for j in siblings[i])
        if near >= own or any(normalise_prompt(p) == normalise_prompt(edits[j].prompt) for j in siblings[i]):
            kind[i] = "ambiguous"
    return kind


def split_metrics(kind: list[str], edits: list, records: Path | list[tuple[str | None, Path]]) -> dict:
    """{method: {group: {"n", "rel_ag", "gen_ag"}}} from bench.quality records files.

    ``records`` is one path or a list of (label or None, path) pairs; see the module doc for labels.
    """
    group_of = {e.id: k for e, k in zip(edits, kind)}
    sums: dict = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for r in labelled_rows(records, ("rel_ag", "gen_ag")):
        if r["id"] not in group_of:
            continue
        for g in (group_of[r["id"]], "all"):
            s = sums[r["method"]][g]
            s[0] += 1
            s[1] += bool(r["rel_ag"])
            s[2] += bool(r["gen_ag"])
    return {m: {g: {"n": s[0], "rel_ag": round(100 * s[1] / s[0], 1), "gen_ag": round(100 * s[2] / s[0], 1)}
                for g, s in groups.items()} for m, groups in sums.items()}


def main(argv: list[str] | None = None) -> int:
    args = records.parser(__doc__.splitlines()[0], records_required=False).parse_args(argv)
    edits = records.edit_set(args)
    kind = classify(edits, base_encoder(MegConfig()).encode)
    counts = {k: kind.count(k) for k in ("alone", "sibling", "ambiguous")}
    result = {"source": args.dataset or str(args.facts), "n_edits": len(edits), "groups": counts}
    print(f"{len(edits)} edits: {counts['alone']} without a contradicting sibling, {counts['sibling']} with one, "
          f"{counts['ambiguous']} whose paraphrase is at least as close to a sibling's prompt")
    if args.records:
        result["methods"] = split_metrics(kind, edits, [records.labelled(r) for r in args.records])
        width = max(16, *(len(m) for m in result["methods"]))
        print(f"{'method':<{width}} {'group':<10} {'n':>5} {'Rel AG':>7} {'Gen AG':>7}")
        for m, groups in result["methods"].items():
            for g in ("alone", "sibling", "ambiguous", "all"):
                if g in groups:
                    s = groups[g]
                    print(f"{m:<{width}} {g:<10} {s['n']:>5} {s['rel_ag']:>7.1f} {s['gen_ag']:>7.1f}")
    records.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
