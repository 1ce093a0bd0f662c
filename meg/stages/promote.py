"""Stage ``promote``: register the candidate bundle, and make it the champion only if it earns it.

1. The candidate (the bundle just evaluated) is registered as a version of ``promote.model_name``,
   whatever happens next; its evaluation metrics and key are tags of that version. The same bundle
   is registered once however often this stage runs.
2. Gates (``promote.min_score`` on the Score, ``promote.min_locality`` on Locality AG): a candidate
   failing one stays registered and is not promoted.
3. It must beat the current champion on the same evaluation, by more than ``promote.min_gain`` Score
   points. "The same evaluation" is the same evaluation key (edit set, probes, locality labels, base
   model, protocol; see ``meg.stages.evaluate``). When the champion was evaluated under another key
   (the facts changed since), the champion's bundle is downloaded and evaluated now on the current
   edit set with the current labels: the question is which model serves today's facts better. A
   champion built on other base-model weights cannot be evaluated on this base model; the candidate
   then only needs to pass the gates, and the reason says so.
4. Promotion moves the alias to the candidate (an alias names one version at a time, so there is
   exactly one champion), and the decision with its reasons is tagged on the version, written to
   ``decision.json`` and logged with the stage's run. Reading the champion, deciding and moving the
   alias happen under the registry's promotion lock (when it has one), so two promotions running at
   once are decided one after the other: the second one compares with the first one's result.

The registry is passed in (``meg.tracking.Registry`` in the pipeline): this module knows no MLflow.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from meg import config
from meg.errors import BundleError
from meg.stages.common import StageResult, read_edits, read_json, write_json, write_metrics

TAG_PREFIX = "meg."


class RegistryLike(Protocol):
    def register(self, bundle_dir: Path, tags: dict[str, str]) -> tuple[str, bool]: ...
    def champion(self, alias: str) -> dict | None: ...
    def set_alias(self, alias: str, version: str) -> None: ...
    def set_tags(self, version: str, tags: dict[str, str]) -> None: ...
    def download_bundle(self, version: str, dst: Path) -> Path: ...


@dataclass
class Decision:
    promoted: bool
    reasons: list[str]
    candidate_version: str
    champion_version: str | None  # the champion before this decision
    eval_key: str
    candidate: dict[str, float]
    champion: dict[str, float] | None = None  # the champion's metrics on this evaluation
    champion_source: str = ""  # "tags" (same evaluation key) or "re-evaluated"
    gates: dict[str, float] = field(default_factory=dict)


def gate_failures(metrics: dict, cfg: config.PromoteConfig) -> list[str]:
    out = []
    if metrics.get("score", 0.0) < cfg.min_score:
        out.append(f"gate failed: Score {metrics.get('score', 0.0):.2f} < min_score {cfg.min_score:.2f}")
    if metrics.get("loc_ag", 0.0) < cfg.min_locality:
        out.append(f"gate failed: Locality (AG) {metrics.get('loc_ag', 0.0):.2f} < min_locality {cfg.min_locality:.2f}")
    return out


def decide(candidate: dict, champion: dict | None, cfg: config.PromoteConfig, note: str = "") -> tuple[bool, list[str]]:
    """Gates first, then the comparison with the champion's metrics on the same evaluation."""
    failures = gate_failures(candidate, cfg)
    if failures:
        return False, failures
    passed = f"gates passed (Score {candidate['score']:.2f} >= {cfg.min_score:.2f}, " \
             f"Locality {candidate['loc_ag']:.2f} >= {cfg.min_locality:.2f})"
    if champion is None:
        return True, [passed, note or "no champion yet"]
    gain = candidate["score"] - champion["score"]
    if gain > cfg.min_gain:
        return True, [passed, f"beats the champion: Score {candidate['score']:.2f} vs {champion['score']:.2f} "
                              f"(+{gain:.2f} > min_gain {cfg.min_gain:.2f})"]
    return False, [passed, f"does not beat the champion: Score {candidate['score']:.2f} vs {champion['score']:.2f} "
                           f"({gain:+.2f} <= min_gain {cfg.min_gain:.2f})"]


def metric_tags(metrics: dict, eval_key: str) -> dict[str, str]:
    tags = {f"{TAG_PREFIX}{k}": f"{v:.4f}" for k, v in metrics.items() if k in ("score", "rel_ag", "rel_tf", "gen_ag",
                                                                               "gen_tf", "loc_ag", "loc_tf")}
    return {**tags, f"{TAG_PREFIX}eval_key": eval_key}


def _metrics_from_tags(tags: dict) -> dict[str, float]:
    out = {}
    for k, v in tags.items():
        if k.startswith(TAG_PREFIX) and k != f"{TAG_PREFIX}eval_key":
            try:
                out[k[len(TAG_PREFIX):]] = float(v)
            except ValueError:
                pass
    return out


def _reevaluate(view: dict, registry: RegistryLike, version: str, prepare_dir: Path) -> dict[str, float]:
    """The champion's metrics on the current edit set and labels (raises BundleError if it cannot run here)."""
    from meg import evaluate
    from meg.editor import EditedModel
    from meg.stages.common import load_base
    from meg.stages.evaluate import finite
    from meg.stages.prepare import read_labels

    edits = read_edits(Path(prepare_dir) / "edits.jsonl")
    loaded = load_base(view)
    labels = read_labels(prepare_dir, loaded)
    tmp = Path(tempfile.mkdtemp(prefix="meg-champion-"))
    try:
        bundle = registry.download_bundle(version, tmp)
        model = EditedModel.load(bundle, loaded)
        model.batch_size = view.get("evaluate", {}).get("batch_size", 32)
        return finite(evaluate.evaluate(model, edits, labels).metrics)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(view: dict, prepare_dir: Path, evaluate_dir: Path, bundle_dir: Path, out_dir: Path,
        registry: RegistryLike) -> StageResult:
    cfg = config.section_config(view, "promote")
    candidate = read_json(Path(evaluate_dir) / "metrics.json")["meg"]
    key = read_json(Path(evaluate_dir) / "report.json")["eval_key"]
    version, new = registry.register(Path(bundle_dir), metric_tags(candidate, key))
    lock = getattr(registry, "promotion_lock", None)
    with lock() if lock else nullcontext():
        current = registry.champion(cfg.alias)
        champion, source, note = None, "", ""
        if current is not None and current["version"] == version:
            promoted, reasons = True, [f"version {version} is already the {cfg.alias}"]
        else:
            if current is not None:
                if current["tags"].get(f"{TAG_PREFIX}eval_key") == key:
                    champion, source = _metrics_from_tags(current["tags"]), "tags"
                else:
                    try:
                        champion, source = _reevaluate(view, registry, current["version"], prepare_dir), "re-evaluated"
                    except BundleError as e:
                        note = f"the champion (version {current['version']}) cannot be evaluated here: {e}"
            promoted, reasons = decide(candidate, champion, cfg, note)
            if promoted:
                registry.set_alias(cfg.alias, version)
        registry.set_tags(version, {f"{TAG_PREFIX}decision": "promoted" if promoted else "not promoted",
                                    f"{TAG_PREFIX}reasons": "; ".join(reasons)[:4000]})
    decision = Decision(promoted, reasons, version, current["version"] if current else None, key, candidate,
                        champion, source, {"min_score": cfg.min_score, "min_locality": cfg.min_locality,
                                           "min_gain": cfg.min_gain})
    out = Path(out_dir)
    write_json(out / "decision.json", asdict(decision))
    metrics = {"promoted": float(promoted), "candidate_score": candidate["score"], "version": float(version)}
    if champion:
        metrics["champion_score"] = champion["score"]
    write_metrics(out, metrics)
    verdict = "promoted to" if promoted else "not promoted to"
    return StageResult("promote", config.flat(view), metrics, [out / "decision.json"],
                       tags={"meg.decision": "promoted" if promoted else "not promoted",
                             "meg.model_version": version},
                       summary=f"{cfg.model_name} version {version} ({'new' if new else 'known'}) {verdict} "
                               f"'{cfg.alias}': " + "; ".join(reasons))
