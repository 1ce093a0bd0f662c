"""Write docs/reliability.md: every fault and bad input the reliability tests try, with counts and outcomes.

``python -m tests.reliability.report`` runs ``pytest tests/reliability --fault-log ...`` and writes
the table; ``--rows FILE`` writes it from the rows of an earlier run instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ("bad fact file", "contradictory facts", "interruption", "corrupted checkpoint",
              "concurrent promotion", "failing registry", "failing store", "wrong base model")
LIMITS = """\
## Known limits

* A JSONL or CSV file cut exactly at the end of a line reads as a shorter, valid file, and a CSV file
  cut inside an unquoted last cell reads with that cell shortened: neither format marks its end.
  JSON lists and any cut inside a JSONL record are refused.
* Parts of the fitting store written before parts carried a sha256, and fit stage outputs written
  before fit.json carried `weights_sha256`, are read without that check (a part that no longer
  parses is still fitted again).
* Replacing an edit bundle moves the old one to `OUT.old` before the new one takes its place: a
  process killed between the two renames leaves the old bundle there and none at `OUT`.
* The promotion lock is a file lock beside a SQLite store: it serialises promotions on one machine.
  A remote tracking server offers no compare-and-set on aliases, so there two promotions racing can
  still both move the alias (the last one wins).
"""


def run_tests(rows_path: Path) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "reliability"),
           f"--fault-log={rows_path}"]
    return subprocess.run(cmd, cwd=ROOT).returncode


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        g = groups.setdefault((row["category"], row["what"]), {"expect": row["expect"], "cases": 0,
                                                                "outcomes": defaultdict(int)})
        g["cases"] += row["cases"]
        g["outcomes"][row["outcome"]] += 1
    order = {c: i for i, c in enumerate(CATEGORIES)}
    lines = ["| Category | Fault or bad input | Handling checked | Cases | Outcome |", "|---|---|---|---:|---|"]
    for (category, what), g in sorted(groups.items(), key=lambda kv: order.get(kv[0][0], 99)):
        n = sum(g["outcomes"].values())
        outcome = "pass" if g["outcomes"].get("passed") == n else \
            ", ".join(f"{k}: {v} of {n}" for k, v in sorted(g["outcomes"].items()))
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {category} | {cell(what)} | {cell(g['expect'])} | {g['cases']} | {outcome} |")
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    n_cases = sum(r["cases"] for r in rows)
    n_failed = sum(r["outcome"] != "passed" for r in rows)
    return f"""# Reliability: faults and bad input

What happens when the input is bad, a process is killed, facts contradict each other, promotions
race or the registry fails half-way. Each row is a fault the tests in `tests/reliability/` inject,
the handling they check, how many cases they tried (examples for the property-based rows) and the
outcome of the last run: {len(rows)} tests, {n_cases} cases, {n_failed} not passed.

Regenerate with `python -m tests.reliability.report` (it runs the tests).

Error messages name the file, the record and the field (`FILE:record N: field 'X': reason`); the
normalisations that are applied instead of an error are listed in the `meg.facts` module docstring.
A refused file leaves the fact store byte for byte unchanged.

{table(rows)}

{LIMITS}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default=None, help="rows of an earlier run (pytest --fault-log FILE)")
    p.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(args.rows) if args.rows else Path(tmp) / "rows.json"
        code = 0 if args.rows else run_tests(rows_path)
        rows = json.loads(rows_path.read_text())
    Path(args.out).write_text(render(rows))
    print(f"wrote {args.out}: {len(rows)} tests")
    return code


if __name__ == "__main__":
    sys.exit(main())
