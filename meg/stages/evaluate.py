"""Stage ``evaluate``: the bundle and the baselines in ``evaluate.methods`` on every edit, side by side.

Runs ``meg.benchmark.run_methods`` with the prepare stage's locality labels; the bundle is the method
``meg`` (loaded, not rebuilt). Writes:

- ``metrics.json``        every method's metrics (percentages; DVC metrics, MLflow metrics);
- ``comparison.json``     one row per method (a DVC bar plot) and ``comparison.png``;
- ``records.jsonl``       every edit's outputs per method;
- ``router.json``         the share of edit prompts, paraphrases and locality prompts the router sent
                          to an edit (a report; nothing is tuned on it);
- ``report.json``         the evaluation key (what "the same evaluation" means for promotion).

The evaluation key hashes the edit set (ids and content), the locality labels, the base model and
the protocol version: two models evaluated under the same key were asked the same questions and
judged the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from meg import config
from meg.evaluate import METRICS, Editor
from meg.stages.common import StageResult, load_base, read_edits, read_json, write_json, write_jsonl

PROTOCOL = "meg.evaluate/2"  # bump when the metrics change meaning (2: edited locality prompts are not asked)
PLOT_COLUMNS = [*METRICS, "score"]


class BundleEditor(Editor):
    """The pipeline's bundle behind the evaluation harness: loading it is the 'edit'."""

    name = "meg"

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def apply(self, loaded, edits):
        from meg.editor import EditedModel, router_confusion

        model = EditedModel.load(self.bundle_dir, loaded)
        model.extra_metrics = router_confusion(model, edits)
        return model

    def exposure(self, edited, edits):
        """The leak counters the attach stage recorded in the bundle (it knows what the build saw)."""
        from meg.probes import RecordedLeaks

        return RecordedLeaks(edited.info.get("leaks"))


def eval_key(edits: list, labels, model_hash: str) -> str:
    blob = json.dumps({"protocol": PROTOCOL, "model": model_hash, "edits": [[e.id, e.content_key] for e in edits],
                       "probes": [[e.paraphrases[:1], [p.prompt for p in e.locality[:1]]] for e in edits],
                       "labels": labels.texts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run(view: dict, prepare_dir: Path, bundle_dir: Path, out_dir: Path) -> StageResult:
    from meg import plots
    from meg.benchmark import run_methods
    from meg.editors import make_editor
    from meg.stages.prepare import read_labels

    cfg = config.section_config(view, "evaluate")
    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    dataset = read_json(Path(prepare_dir) / "report.json")["dataset"]
    loaded = load_base(view)
    labels = read_labels(prepare_dir, loaded)

    def factory(name: str) -> Editor:
        return BundleEditor(bundle_dir) if name == "meg" else make_editor(name)

    result = run_methods(loaded, edits, dataset, ["meg", *cfg.methods], cfg.batch_size,
                         editor_factory=factory, labels=labels)
    out = Path(out_dir)
    metrics = {name: finite(m) for name, m in result.methods.items()}
    write_json(out / "metrics.json", metrics)
    write_json(out / "comparison.json", [{"method": name, **{c: m.get(c) for c in PLOT_COLUMNS}}
                                         for name, m in metrics.items()])
    write_jsonl(out / "records.jsonl", [{"method": name, **r} for name, rows in result.records.items() for r in rows])
    extras = result.extras.get("meg", {})
    router_info = {k: v for k, v in extras.items() if k not in ("leaks", "label")}  # numbers only
    write_json(out / "router.json", router_info)
    write_json(out / "leaks.json", {name: x.get("leaks") for name, x in result.extras.items()})
    key = eval_key(edits, labels, loaded.content_hash)
    write_json(out / "report.json", {"eval_key": key, "protocol": PROTOCOL, "dataset": dataset,
                                     "n_edits": len(edits), "methods": list(metrics)})
    plots.comparison(metrics, PLOT_COLUMNS, out / "comparison.png", f"{dataset}: {len(edits)} edits")
    (out / "table.txt").write_text(result.table() + "\n")
    flat_metrics = {f"{name}.{k}": v for name, m in metrics.items() for k, v in m.items()}
    flat_metrics.update({f"meg.{k}": float(v) for k, v in router_info.items()})
    flat_metrics.update({f"{name}.leaks.{k}": float(v) for name, x in result.extras.items()
                         for k, v in (x.get("leaks") or {}).items()})
    meg = metrics["meg"]
    return StageResult(
        "evaluate", config.flat(view), flat_metrics,
        [out / "metrics.json", out / "comparison.json", out / "comparison.png", out / "router.json", out / "leaks.json",
         out / "records.jsonl", out / "table.txt"],
        tags={"meg.eval_key": key},
        summary=f"meg on {len(edits)} edits: Score {meg['score']:.1f} (Rel {meg['rel_ag']:.1f} / "
                f"Gen {meg['gen_ag']:.1f} / Loc {meg['loc_ag']:.1f}, AG)\n{result.table()}",
    )
