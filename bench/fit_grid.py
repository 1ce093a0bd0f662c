"""Per-edit fitting settings side by side: reliability, paraphrase transfer, steps and cost.

    python -m bench.fit_grid --n 64 --out OUT.json \\
        --grid '[{"layer": 28, "optimizer": "nesterov", "lr": 1.0, "n_variants": 4}, {"layer": 24, "lr": 2.0}]'

Each grid entry is a set of meg.fit.FitConfig fields plus ``layer``. The edits are the last ``n``
records of the CounterFact train split (pseudo-edits: never evaluated, disjoint from the records
the template bank of rewordings is built from). ``transfer`` is the share of edits whose own fitted
neuron also produces the target on the edit's paraphrase; ``spill`` the share of neighbourhood
prompts whose greedy answer the neuron leaves unchanged (meg.sweep).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meg import fit, lm, sweep
from meg.augment import TemplateBank
from meg.facts import load_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="pseudo-edits from the end of the CounterFact train split")
    p.add_argument("--grid", required=True, help="JSON list of FitConfig settings, each with 'layer'")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    grid = json.loads(args.grid)
    if not isinstance(grid, list) or not all(isinstance(g, dict) and "layer" in g for g in grid):
        p.error("--grid: expected a JSON list of objects, each with a 'layer'")
    loaded = lm.load_model(args.model)
    pool = load_benchmark("counterfact", "train")
    edits, bank = pool[-args.n:], TemplateBank.from_records(pool[: -args.n])
    rows = []
    for settings in grid:
        settings = dict(settings)
        layer = settings.pop("layer")
        cfg = fit.FitConfig(**settings)
        row = sweep.sweep_layers(loaded, edits, [layer], cfg, progress=False, bank=bank if cfg.uses_bank else None)[0]
        row.update(settings)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
