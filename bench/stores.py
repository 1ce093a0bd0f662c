"""Copy fitted-weight stores between places, so fitting done once is not done again elsewhere.

Each store (a directory of safetensors parts, ``meg.fit.WeightStore``) under SRC is copied into the
store of the same name under DST; only the entries DST lacks are copied, as one new part per store.
The z of MEMIT and AlphaEdit (about 4 s per edit and core for SmolLM2-135M) are the costly case:

    python -m bench.stores copy $MEG_HOME/baselines/z bench/stores/z    # keep the z with the benchmark
    python -m bench.stores copy bench/stores/z $MEG_HOME/baselines/z    # and take them up again

A store name is a hash of the model, the layer and the z settings, so entries only ever reach a run
that would have fitted exactly them (and a part that does not match its sha256 is never read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meg import fit


def copy_stores(src: Path, dst: Path) -> dict[str, int]:
    """Entries copied per store name (0 where DST had them all)."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such directory of stores")
    copied = {}
    for store_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        have = set(fit.WeightStore(dst / store_dir.name).load()) if (dst / store_dir.name).is_dir() else set()
        copied[store_dir.name] = fit.WeightStore(store_dir).export(dst / store_dir.name, lambda key: key not in have)
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stores", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="copy the entries of every store under SRC that DST lacks")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    args = p.parse_args(argv)
    try:
        copied = copy_stores(args.src, args.dst)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, n in copied.items():
        print(f"{args.dst / name}: {n} entries copied")
    if not copied:
        print(f"{args.src}: no stores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
