"""Reading bench.quality's per-edit records, and the command line of the analyses that read them.

``bench.siblings`` and ``bench.locality_split`` split a run's metrics by a property of each edit.
Both take an edit set (``--dataset``/``--facts``, ``--n-edits``) and records files
(``--records [LABEL=]PATH``, repeatable), and write a JSON result.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from meg import facts


def read_records(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The records of a bench.quality records file; a line that is not JSON or lacks one of
    ``fields`` stops with the file and line named."""
    rows = []
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
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


def labelled(arg: str) -> tuple[str | None, Path]:
    """"LABEL=PATH" -> (LABEL, PATH); a bare path (also one holding "=", if it exists) -> (None, PATH)."""
    label, sep, path = arg.partition("=")
    return (label or None, Path(path)) if sep and not Path(arg).is_file() else (None, Path(arg))


def labelled_rows(records: Path | list[tuple[str | None, Path]], fields: tuple[str, ...]) -> list[dict]:
    """Every record of the given files; a labelled file's method becomes LABEL (one method in the
    file) or LABEL/METHOD (several), so runs of one method can stand side by side."""
    if isinstance(records, Path):
        records = [(None, records)]
    out = []
    for label, path in records:
        rows = read_records(path, ("method", "id", *fields))
        methods = {r["method"] for r in rows}
        for r in rows:
            if label:
                r["method"] = label if len(methods) == 1 else f"{label}/{r['method']}"
            out.append(r)
    return out


def parser(description: str, records_required: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["counterfact", "zsre"])
    src.add_argument("--facts", type=Path)
    p.add_argument("--n-edits", type=int, default=None, help="the first N edits: the edit set the records ran with")
    p.add_argument("--records", action="append", default=[], required=records_required, metavar="[LABEL=]PATH",
                   help="per-edit outputs of bench.quality (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    return p


def edit_set(args: argparse.Namespace) -> list:
    edits = facts.load_benchmark(args.dataset, "edit") if args.dataset else facts.read_facts(args.facts)
    return edits[: args.n_edits] if args.n_edits else edits


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")
