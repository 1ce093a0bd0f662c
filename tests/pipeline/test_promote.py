"""Registration and promotion through a real MLflow registry (SQLite in a temporary directory)."""

from __future__ import annotations

import json

import pytest

from meg import config, runner, tracking
from meg.stages import promote as promote_stage
from meg.stages.common import write_json
from tests.pipeline.conftest import copy_workspace, write_params

NAME = "meg-editor"


@pytest.fixture
def ws(built, tmp_path, monkeypatch):
    """A fresh copy of the built workspace (gates at Score 50 / Locality 70) with its own MLflow store."""
    root = copy_workspace(built, tmp_path / "ws", monkeypatch)
    params = config.load_params(root / "params.yaml")
    params["promote"].update(min_score=50.0, min_locality=70.0)
    write_params(root, params)
    return root


def rebuild_bundle(root, seed: int, tracked: bool = False):
    """Another bundle (another sampling seed: another manifest, another sha256)."""
    params = config.load_params(root / "params.yaml")
    params["attach"]["sample_seed"] = seed
    write_params(root, params)
    import os

    os.environ["MEG_TRACKING"] = "on" if tracked else "off"
    try:
        runner.run_stage("attach", root / "params.yaml", root, progress=False)
    finally:
        os.environ["MEG_TRACKING"] = "on"


def set_candidate(root, score: float, loc: float, key: str | None = None):
    """The evaluation result promotion reads (its numbers chosen by the test)."""
    ev = root / "artifacts" / "evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    metrics["meg"].update(score=score, loc_ag=loc)
    write_json(ev / "metrics.json", metrics)
    if key is not None:
        report = json.loads((ev / "report.json").read_text())
        report["eval_key"] = key
        write_json(ev / "report.json", report)


def promote(root):
    runner.run_stage("promote", root / "params.yaml", root, progress=False)
    return json.loads((root / "artifacts" / "promote" / "decision.json").read_text())


def registry(root):
    tracking.configure(root)
    return tracking.Registry(NAME)


def test_decide_gates_then_champion():
    cfg = config.PromoteConfig(min_score=50, min_locality=70, min_gain=1.0)
    ok, why = promote_stage.decide({"score": 49.0, "loc_ag": 90.0}, None, cfg)
    assert not ok and "Score 49.00 < min_score 50.00" in why[0]
    ok, why = promote_stage.decide({"score": 80.0, "loc_ag": 60.0}, None, cfg)
    assert not ok and "Locality (AG) 60.00 < min_locality 70.00" in why[0]
    ok, why = promote_stage.decide({"score": 80.0, "loc_ag": 90.0}, None, cfg)
    assert ok and "no champion yet" in why[1]
    ok, why = promote_stage.decide({"score": 80.5, "loc_ag": 90.0}, {"score": 80.0}, cfg)
    assert not ok and "does not beat the champion" in why[1]
    ok, why = promote_stage.decide({"score": 81.5, "loc_ag": 90.0}, {"score": 80.0}, cfg)
    assert ok and "beats the champion" in why[1]


def test_a_candidate_failing_a_gate_is_registered_but_not_promoted(ws):
    set_candidate(ws, score=20.0, loc=95.0)
    decision = promote(ws)
    assert decision["promoted"] is False
    assert any("gate failed: Score" in r for r in decision["reasons"])
    reg = registry(ws)
    versions = reg.client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["meg.decision"] == "not promoted"
    assert reg.champion("champion") is None and reg.holders("champion") == []


def test_the_alias_moves_only_to_better_candidates_and_stays_unique(ws):
    rebuild_bundle(ws, seed=0, tracked=True)  # attach logs the pyfunc model; promotion registers that one
    set_candidate(ws, score=60.0, loc=90.0)
    first = promote(ws)
    assert first["promoted"] and first["candidate_version"] == "1"
    reg = registry(ws)
    v1 = reg.client.get_model_version(NAME, "1")
    bundle = ws / "artifacts" / "attach" / "bundle"
    logged = tracking._find_logged_model(tracking.bundle_sha256(bundle), bundle)
    assert logged and v1.source == logged  # the model attach logged, not a second copy

    again = promote(ws)  # same bundle: the same version, no new registration
    assert again["candidate_version"] == "1" and again["promoted"]
    assert len(reg.client.search_model_versions(f"name = '{NAME}'")) == 1

    rebuild_bundle(ws, seed=1)
    set_candidate(ws, score=55.0, loc=90.0)  # same evaluation key, lower Score
    worse = promote(ws)
    assert worse["candidate_version"] == "2" and not worse["promoted"]
    assert worse["champion"]["score"] == pytest.approx(60.0) and worse["champion_source"] == "tags"
    assert reg.holders("champion") == ["1"]

    rebuild_bundle(ws, seed=2)
    set_candidate(ws, score=70.0, loc=90.0)
    better = promote(ws)
    assert better["candidate_version"] == "3" and better["promoted"] and better["champion_version"] == "1"
    assert reg.champion("champion")["version"] == "3"
    assert reg.holders("champion") == ["3"]  # exactly one champion
    tags = reg.client.get_model_version(NAME, "3").tags
    assert tags["meg.decision"] == "promoted" and "beats the champion" in tags["meg.reasons"]
    assert float(tags["meg.score"]) == pytest.approx(70.0)


def test_a_champion_from_another_evaluation_is_re_evaluated_on_the_current_one(ws):
    real = json.loads((ws / "artifacts" / "evaluate" / "metrics.json").read_text())["meg"]
    real_key = json.loads((ws / "artifacts" / "evaluate" / "report.json").read_text())["eval_key"]
    params = config.load_params(ws / "params.yaml")
    params["promote"].update(min_score=0.0, min_locality=0.0)
    write_params(ws, params)
    # the champion: this bundle, registered under another evaluation (e.g. before facts were added)
    set_candidate(ws, score=real["score"], loc=real["loc_ag"], key="an-older-evaluation")
    assert promote(ws)["promoted"]
    rebuild_bundle(ws, seed=5)
    set_candidate(ws, score=real["score"], loc=real["loc_ag"], key=real_key)
    decision = promote(ws)
    assert decision["champion_source"] == "re-evaluated"
    # evaluated again on the current edits and labels, the champion scores what it scored here before
    for k in ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score"):
        assert decision["champion"][k] == pytest.approx(real[k], abs=1e-6), k


def test_promote_needs_tracking(ws, monkeypatch):
    monkeypatch.setenv("MEG_TRACKING", "off")
    from meg.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the MLflow model registry"):
        runner.run_stage("promote", ws / "params.yaml", ws, progress=False)


def test_stage_runs_nest_under_the_pipeline_run(ws, monkeypatch):
    import mlflow

    tracking.configure(ws)
    parent = tracking.start_pipeline_run("test")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    runner.run_stage("router", ws / "params.yaml", ws, progress=False)
    tracking.end_pipeline_run(parent, True)
    runs = mlflow.search_runs(experiment_names=["meg"], output_format="list")
    child = next(r for r in runs if r.data.tags.get("meg.stage") == "router")
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert "router.objective" in child.data.params and "threshold" in child.data.metrics
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "router")}
    assert "router/calibration.json" in arts
    assert mlflow.get_run(parent).info.status == "FINISHED"
