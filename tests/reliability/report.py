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
              "concurrent promotion", "failing registry", "failing store", "S3 outage", "wrong base model")
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
* A bundle is registered only after the store was seen to hold each of its files at its size (not
  its sha256: that would mean downloading it again). Nothing checks a registered version's files
  afterwards: a store that loses them later (an in-memory S3 restarted) leaves a version that cannot
  be downloaded. Each failed upload attempt leaves a logged model with status FAILED.
* meg never runs `dvc push` and does not retry it: a failed push leaves the DVC cache and workspace
  as they were, and rerunning it completes it. DVC asks the remote which objects it holds, so a
  remote that lost objects, or restarted empty, gets all of them again.
* Retries multiply: with botocore's default of 5 attempts per request (legacy mode), each of meg's
  attempts against a dead endpoint takes about 7 s (jittered, at most 15 s) before meg's own backoff.
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
race, the registry fails half-way or S3 goes down during `dvc push` or an upload to MLflow. Each
row is a fault the tests in `tests/reliability/` inject, the handling they check, how many cases
they tried (examples for the property-based rows) and the outcome of the last run: {len(rows)} tests,
{n_cases} cases, {n_failed} not passed.

Regenerate with `python -m tests.reliability.report` (it runs the tests).

Error messages name the file, the record and the field (`FILE:record N: field 'X': reason`); the
normalisations that are applied instead of an error are listed in the `meg.facts` module docstring.
A refused file leaves the fact store byte for byte unchanged. An upload to the MLflow artifact
store that fails ends in StoreError naming the store and its endpoint, after retries with
exponential backoff when the failure may pass (`MEG_STORE_RETRIES`, `MEG_STORE_BACKOFF`).

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
