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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_facts,):
        add(sub)
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
