"""The `meg` command. Each subcommand is a thin shell over a function in the library.

Subcommands register themselves through small `_add_<name>` functions below; the work they do
lives in the core modules, never here.
"""

from __future__ import annotations

import argparse
import sys

from meg.errors import MegError


def _add_facts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("facts", help="validate and manage fact files")
    fsub = p.add_subparsers(dest="facts_cmd", required=True)
    v = fsub.add_parser("validate", help="check a fact file; exit 0 if good, 2 with one line per problem")
    v.add_argument("file")
    v.add_argument("--format", choices=["auto", "counterfact", "zsre", "jsonl", "csv"], default="auto")
    v.set_defaults(func=_facts_validate)


def _facts_validate(args: argparse.Namespace) -> int:
    from meg.facts import validate_file

    report = validate_file(args.file, fmt=args.format)
    for line in report.notes:
        print(line, file=sys.stderr)
    if report.problems:
        for p in report.problems:
            print(p)
        return 2
    print(f"{args.file}: {report.n_records} records, {report.n_edits} edits after de-duplication: OK")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="the raw fact sets tracked by data.dvc")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    r = dsub.add_parser("restore", help="write data/ from the copies shipped in the package (no network)")
    r.add_argument("--dest", default="data")
    r.set_defaults(func=_data_restore)


def _data_restore(args: argparse.Namespace) -> int:
    from meg.data import restore_raw_data

    written = restore_raw_data(args.dest)
    print(f"{args.dest}: {written} files restored" if written else f"{args.dest}: already complete")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep-layers", help="reliability, paraphrase transfer and cost of the neuron per layer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="comma-separated; default: every third layer")
    p.add_argument("--n-edits", type=int, default=64, help="pseudo-edits from the CounterFact train split")
    p.add_argument("--optimizer", default="nesterov", choices=["nesterov", "sgd", "adam"])
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--n-variants", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    import json

    from meg import fit, lm, sweep
    from meg.augment import TemplateBank
    from meg.facts import load_benchmark

    loaded = lm.load_model(args.model)
    n = lm.num_layers(loaded.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(2, n, 3))
    pool = load_benchmark("counterfact", "train")
    edits, rest = pool[: args.n_edits], pool[args.n_edits :]
    bank = TemplateBank.from_records(rest) if args.n_variants else None
    cfg = fit.FitConfig(optimizer=args.optimizer, lr=args.lr, n_variants=args.n_variants)
    rows = sweep.sweep_layers(loaded, edits, layers, cfg, progress=False, bank=bank)
    print(f"{'layer':>5} {'rel%':>6} {'transfer%':>9} {'spill%':>7} {'steps':>6} {'s/edit':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['reliability']:>6.1f} {r['transfer']:>9.1f} {r['spill']:>7.1f} "
              f"{r['steps_median']:>6.0f} {r['seconds_per_edit']:>7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": loaded.model_id, "config": vars(args) | {"func": None}, "rows": rows}, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_facts, _add_data, _add_sweep):
        add(sub)
    from meg.cli_model import add_model_commands

    add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MegError as e:
        print(f"meg: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
