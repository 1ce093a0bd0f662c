"""Copy fitted-weight stores between places, so fitting done once is not done again elsewhere.

Each store (a directory of safetensors parts, ``meg.fit.WeightStore``) under SRC is copied into the
store of the same name under DST; only the entries DST lacks are copied, as one new part per store.
The z of MEMIT and AlphaEdit (about 4 s per edit and core for SmolLM2-135M) are the costly case:

    python -m bench.stores copy $MEG_HOME/baselines/z bench/stores/z    # keep the z with the benchmark
    python -m bench.stores copy bench/stores/z $MEG_HOME/baselines/z    # and take them up again

A store name is a hash of the model, the layer and the z settings, so entries only ever reach a run
that would have fitted exactly them (and a part that does not match its sha256 is never read).

The rewordings the base model writes for the benchmarks' relation templates (meg.rewrite) are shipped in
the package the same way, as the seed of every machine's cache:

    python -m bench.stores rewrites            # sample what is missing, write meg/assets/rewrites/
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


def package_rewrites(model: str, out: Path) -> tuple[Path, int]:
    """Sample (or take from the cache) the candidates of every benchmark template a default build rewrites, the
    pseudo-edit pool's and the benchmark edit splits', and write them gzipped as the package's seed."""
    import gzip
    import json

    from meg import lm
    from meg.editor import MegConfig, _canonical_items, build_blocklist, rewordings_for

    loaded = lm.load_model(model)
    rw = rewordings_for(loaded, MegConfig(), build_blocklist([]), progress=True)
    rw.prepare(_canonical_items())
    prompts = sorted({rep[0] for rep in rw._canonical.values()} | set(rw.rewriter._load()))
    found = rw.rewriter.candidates(prompts)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{rw.rewriter.cache_file.stem}.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "candidates": found[p]}, ensure_ascii=False) + "\n")
    return path, len(prompts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stores", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="copy the entries of every store under SRC that DST lacks")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    r = sub.add_parser("rewrites", help="write the package's seed of model-written rewordings (meg.rewrite)")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "meg" / "assets" / "rewrites")
    args = p.parse_args(argv)
    if args.command == "rewrites":
        path, n = package_rewrites(args.model, args.out)
        print(f"{path}: candidates of {n} prompts")
        return 0
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
