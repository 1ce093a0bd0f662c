"""Contradicting siblings in an edit set, and how a method's generality splits over them.

    python -m bench.siblings --dataset zsre --n-edits 1037 --records OUT.records.jsonl --out SIB.json
    python -m bench.siblings --dataset zsre --n-edits 1037 --records before=A.records.jsonl \
        --records after=B.records.jsonl --out SIB.json

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

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from meg import facts
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


def read_records(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The records of a bench.quality records file; a line that is not JSON or lacks one of
    ``fields`` stops with the file and line named."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                missing = [k for k in fields if k not in r]
                if missing:
                    raise KeyError(", ".join(missing))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{path}: record {n}: not a bench.quality record ({e})")
            rows.append(r)
    return rows


def split_metrics(kind: list[str], edits: list, records: Path | list[tuple[str | None, Path]]) -> dict:
    """{method: {group: {"n", "rel_ag", "gen_ag"}}} from bench.quality records files.

    ``records`` is one path or a list of (label or None, path) pairs; see the module doc for labels.
    """
    if isinstance(records, Path):
        records = [(None, records)]
    group_of = {e.id: k for e, k in zip(edits, kind)}
    sums: dict = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for name, path in records:
        rows = [(r["method"], r["id"], r["rel_ag"], r["gen_ag"])
                for r in read_records(path, ("method", "id", "rel_ag", "gen_ag"))]
        methods = {m for m, *_ in rows}
        for method, rid, rel, gen in rows:
            if rid not in group_of:
                continue
            if name:
                method = name if len(methods) == 1 else f"{name}/{method}"
            for g in (group_of[rid], "all"):
                s = sums[method][g]
                s[0] += 1
                s[1] += bool(rel)
                s[2] += bool(gen)
    return {m: {g: {"n": s[0], "rel_ag": round(100 * s[1] / s[0], 1), "gen_ag": round(100 * s[2] / s[0], 1)}
                for g, s in groups.items()} for m, groups in sums.items()}


def _labelled(arg: str) -> tuple[str | None, Path]:
    """"LABEL=PATH" -> (LABEL, PATH); a bare path (also one holding "=", if it exists) -> (None, PATH)."""
    label, sep, path = arg.partition("=")
    return (label or None, Path(path)) if sep and not Path(arg).is_file() else (None, Path(arg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["counterfact", "zsre"])
    src.add_argument("--facts", type=Path)
    p.add_argument("--n-edits", type=int, default=None)
    p.add_argument("--records", action="append", default=[], metavar="[LABEL=]PATH",
                   help="per-edit outputs of bench.quality (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    edits = facts.load_benchmark(args.dataset, "edit") if args.dataset else facts.read_facts(args.facts)
    edits = edits[: args.n_edits] if args.n_edits else edits
    kind = classify(edits, base_encoder(MegConfig()).encode)
    counts = {k: kind.count(k) for k in ("alone", "sibling", "ambiguous")}
    result = {"source": args.dataset or str(args.facts), "n_edits": len(edits), "groups": counts}
    print(f"{len(edits)} edits: {counts['alone']} without a contradicting sibling, {counts['sibling']} with one, "
          f"{counts['ambiguous']} whose paraphrase is at least as close to a sibling's prompt")
    if args.records:
        result["methods"] = split_metrics(kind, edits, [_labelled(r) for r in args.records])
        width = max(16, *(len(m) for m in result["methods"]))
        print(f"{'method':<{width}} {'group':<10} {'n':>5} {'Rel AG':>7} {'Gen AG':>7}")
        for m, groups in result["methods"].items():
            for g in ("alone", "sibling", "ambiguous", "all"):
                if g in groups:
                    s = groups[g]
                    print(f"{m:<{width}} {g:<10} {s['n']:>5} {s['rel_ag']:>7.1f} {s['gen_ag']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
