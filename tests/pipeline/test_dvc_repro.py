"""`dvc repro` of the repository's dvc.yaml in a scratch copy: runs everything once, then nothing,
then only the stages that read a changed setting; metrics and plots show; MLflow holds the runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.pipeline.conftest import ROOT, small_params, subprocess_env, write_params


def _copy_repo(dst):
    shutil.copytree(ROOT / "meg", dst / "meg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def _run(args, cwd, env, check=True) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"{args} failed ({done.returncode}):\n{out[-4000:]}")
    return out


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", out)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir):
    from meg.data import restore_raw_data

    root = tmp_path_factory.mktemp("repo")
    _copy_repo(root)
    restore_raw_data(root / "data")
    write_params(root, small_params(tiny_model_dir))
    env = subprocess_env()
    env.pop("PYTHONPATH")  # the copy's own meg/ (cwd) must be the one imported
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MEG_PARENT_RUN_ID", None)
    out = _run(["-m", "meg.cli", "repro"], root, env)
    return root, env, out


def test_first_repro_runs_every_stage_nested_under_one_mlflow_run(repo):
    root, env, out = repo
    assert _ran(out) == ["prepare", "fit", "encoder", "router", "generator", "attach", "evaluate", "promote"]
    assert (root / "artifacts" / "attach" / "bundle" / "manifest.json").is_file()
    decision = json.loads((root / "artifacts" / "promote" / "decision.json").read_text())
    assert decision["candidate_version"] == "1" and decision["promoted"]  # gates at 0 in the small settings
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["meg"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("meg.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["meg.stage"] for r in children) == sorted(
        ["prepare", "fit", "encoder", "router", "generator", "attach", "evaluate", "promote"])
    assert all(r.info.status == "FINISHED" for r in children)


def test_second_repro_does_nothing(repo):
    root, env, _ = repo
    stamp = (root / "artifacts" / "fit" / "weights.safetensors").stat().st_mtime_ns
    out = _run(["-m", "dvc", "repro"], root, env)
    assert _ran(out) == []
    assert "didn't change" in out or "up to date" in out
    assert (root / "artifacts" / "fit" / "weights.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("section,key,value,expected", [
    ("evaluate", "batch_size", 8, ["evaluate", "promote"]),
    ("router", "objective", "balanced", ["router", "attach"]),
    ("encoder", "n_pseudo", 48, ["encoder", "router", "attach"]),
    ("fit", "n_variants", 1, ["fit", "generator", "attach"]),
    ("promote", "min_gain", 1.0, ["promote"]),
])
def test_a_changed_setting_marks_exactly_the_stages_that_read_it(repo, section, key, value, expected):
    """`dvc repro --dry` lists the stages whose own settings changed; the stages after them rerun
    only when a file they read changes (test_a_rerun_after_a_change_touches_only_those_stages)."""
    root, env, _ = repo
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    write_params(root, params)
    try:
        out = _run(["-m", "dvc", "repro", "--dry"], root, env)
    finally:
        (root / "params.yaml").write_text(original)
    assert _ran(out) == expected


def test_a_rerun_after_a_change_touches_only_those_stages(repo):
    root, env, _ = repo
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["batch_size"] = 4
    write_params(root, params)
    stamps = {p: p.stat().st_mtime_ns for p in (root / "artifacts").rglob("*") if p.is_file()}
    try:
        out = _run(["-m", "meg.cli", "repro"], root, env)
    finally:
        (root / "params.yaml").write_text(original)
    assert _ran(out) == ["evaluate", "promote"]
    changed = {p.relative_to(root / "artifacts").parts[0] for p, t in stamps.items()
               if not p.exists() or p.stat().st_mtime_ns != t}
    assert changed == {"evaluate", "promote"}


def test_metrics_and_plots_show(repo):
    root, env, _ = repo
    shown = json.loads(_run(["-m", "dvc", "metrics", "show", "--json"], root, env))
    text = json.dumps(shown)
    for path in ("artifacts/evaluate/metrics.json", "artifacts/fit/metrics.json", "artifacts/router/metrics.json",
                 "artifacts/promote/metrics.json"):
        assert path in text
    assert '"score"' in text
    _run(["-m", "dvc", "plots", "show", "-o", str(root / "plots-out")], root, env)
    html = (root / "plots-out" / "index.html").read_text()
    assert "Generator training" in html and "Score by method" in html
    assert 'id="artifacts_evaluate_comparison_png"' in html and 'id="artifacts_generator_curve_png"' in html


def test_new_facts_rerun_the_pipeline_incrementally(repo):
    """`meg facts add` then `meg repro`: only the new edits are fitted, the encoder is not retrained,
    the generator warm-starts, the router is recalibrated, and the champion is re-evaluated on the
    new edit set before the candidate may replace it."""
    root, env, _ = repo
    facts = root / "week.jsonl"
    facts.write_text(json.dumps({"prompt": "The chief engineer of Ganymede Station is", "target_new": "Ada Okafor",
                                 "paraphrases": ["Ganymede Station's chief engineer is"],
                                 # a probe no pseudo-edit holds: the pool, and so the encoder, stay as they are
                                 "locality_prompt": "The capital of Zorblandia is"}) + "\n"
                     + json.dumps({"prompt": "The mascot of the Zorbl team is", "target_new": "a heron"}) + "\n")
    out = _run(["-m", "meg.cli", "facts", "add", str(facts)], root, env)
    assert "2 new, 0 overriding, 0 duplicates" in out and "data.dvc updated" in out
    out = _run(["-m", "meg.cli", "repro"], root, env)
    assert _ran(out) == ["prepare", "fit", "router", "generator", "attach", "evaluate", "promote"]
    fit = json.loads((root / "artifacts" / "fit" / "metrics.json").read_text())
    assert fit["n_fitted"] == 2 and fit["n_edits"] == 10
    gen = json.loads((root / "artifacts" / "generator" / "report.json").read_text())
    assert gen["warm_start"] is True
    calib = json.loads((root / "artifacts" / "router" / "calibration.json").read_text())
    assert calib["n_edits"] == 10
    decision = json.loads((root / "artifacts" / "promote" / "decision.json").read_text())
    assert decision["candidate_version"] == "2" and decision["champion_version"] == "1"
    assert decision["champion_source"] == "re-evaluated"
    assert _ran(_run(["-m", "dvc", "repro"], root, env)) == []
