"""Methods against the number of edits: one table and one PNG from the per-run JSON of bench.quality.

    python -m bench.scale docs/results/*.json --dataset counterfact --model smollm2-135m \
        --methods none,ft,grace,memit,alphaedit,meg --table docs/results/scale-counterfact.md \
        --png docs/results/scale-counterfact.png

Every file is one bench.quality run (``dataset``, ``n_edits``, ``model``, ``methods``); runs of
other datasets or models are skipped. A method measured at the same size by several files keeps
the one given last on the command line (list the files in the order they should override), and
the table says which file each number comes from and how many of the edits were evaluated
(``bench.quality --eval-edits``: the first ones). The PNG has four panels (Score, Rel AG, Gen AG,
Loc AG) against the number of edits, one line per method, on a logarithmic axis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meg import plots

PANELS = (("score", "Score"), ("rel_ag", "Rel AG"), ("gen_ag", "Gen AG"), ("loc_ag", "Loc AG"))


class ScaleInputError(ValueError):
    """A results file that is not a bench.quality run; the message names the file and field."""


def read_run(path: Path) -> dict:
    """One bench.quality result, checked for what the table needs."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ScaleInputError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(run, dict):
        raise ScaleInputError(f"{path}: expected a JSON object (a bench.quality result)")
    for key in ("dataset", "n_edits", "methods"):
        if key not in run:
            raise ScaleInputError(f"{path}: missing field '{key}' (not a bench.quality result)")
    if not isinstance(run["n_edits"], int) or run["n_edits"] < 1:
        raise ScaleInputError(f"{path}: field 'n_edits' must be a positive integer, got {run['n_edits']!r}")
    if not isinstance(run["methods"], dict):
        raise ScaleInputError(f"{path}: field 'methods' must map method names to metrics")
    for name, metrics in run["methods"].items():
        missing = [k for k, _ in PANELS if not isinstance((metrics or {}).get(k), (int, float))]
        if missing:
            raise ScaleInputError(f"{path}: methods.{name}: missing or non-numeric field '{missing[0]}'")
    return run


def collect(paths: list[Path], dataset: str, model: str | None = None,
            methods: list[str] | None = None) -> dict[tuple[str, int], dict]:
    """``{(method, n_edits): metrics + {"file": name}}`` over the runs of ``dataset`` (and ``model``)."""
    points: dict[tuple[str, int], dict] = {}
    for path in paths:
        run = read_run(path)
        if run["dataset"] != dataset or (model and run.get("model") not in (None, model)):
            continue
        for name, metrics in run["methods"].items():
            if methods is None or name in methods:
                points[(name, run["n_edits"])] = {**metrics, "file": Path(path).name,
                                                  "n_evaluated": run.get("n_evaluated") or run["n_edits"]}
    return points


def _fmt(x, digits: int = 1) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def table(points: dict[tuple[str, int], dict], methods: list[str] | None = None) -> str:
    """Markdown: one row per method and size, in the order of ``methods`` then size."""
    order = methods or sorted({m for m, _ in points})
    lines = ["| method | edits | evaluated | Score | Rel AG | Gen AG | Loc AG | edit s | peak RSS MB | file |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in order:
        for n in sorted(n for m, n in points if m == method):
            p = points[(method, n)]
            lines.append(f"| {method} | {n:,} | {p.get('n_evaluated', n):,} | {_fmt(p['score'])} | {_fmt(p['rel_ag'])} | {_fmt(p['gen_ag'])} | "
                         f"{_fmt(p['loc_ag'])} | {_fmt(p.get('edit_seconds'), 0)} | {_fmt(p.get('peak_rss_mb'), 0)} | "
                         f"`{p['file']}` |")
    return "\n".join(lines) + "\n"


def plot(points: dict[tuple[str, int], dict], path: Path, title: str, methods: list[str] | None = None) -> Path:
    """Four panels (Score, Rel, Gen, Loc in AG) against the number of edits, one line per method."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6), sharex=True)
    order = methods or sorted({m for m, _ in points})
    for ax, (key, label) in zip(axes, PANELS):
        for method in order:
            sizes = sorted(n for m, n in points if m == method)
            if sizes:
                ax.plot(sizes, [points[(method, n)][key] for n in sizes], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("edits")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, y=1.03)
    return plots.save(fig, Path(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench.quality JSON files")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", default=None, help="only runs on this model (registry name)")
    p.add_argument("--methods", default=None, help="comma-separated, in table and legend order (default: all)")
    p.add_argument("--table", type=Path, default=None, help="write the markdown table here (else print it)")
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        points = collect([f for f in args.results if f.suffix == ".json"], args.dataset, args.model, methods)
    except ScaleInputError as e:
        print(f"bench.scale: {e}", file=sys.stderr)
        return 2
    if not points:
        print(f"bench.scale: no run of dataset {args.dataset!r}"
              + (f" on model {args.model!r}" if args.model else "") + " among the files given", file=sys.stderr)
        return 2
    text = table(points, methods)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text)
        print(f"table: {args.table}")
    else:
        print(text, end="")
    if args.png:
        title = f"{args.dataset}" + (f", {args.model}" if args.model else "")
        print(f"plot: {plot(points, args.png, title, methods)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
