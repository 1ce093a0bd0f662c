"""The Kubeflow pipeline: compiled spec structure, and a whole run with kfp's local subprocess runner."""

from __future__ import annotations

import json

import pytest
import yaml

from components import IMAGE
from tests.pipeline.conftest import small_params, write_params

STAGE_COMPONENTS = {"comp-prepare", "comp-fit-shard", "comp-fit-merge", "comp-encoder", "comp-router",
                    "comp-generator", "comp-attach", "comp-evaluate", "comp-promote", "comp-start-run", "comp-end-run"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The spec compiled for generated weights (the setting whose generator step trains)."""
    from pipeline.compile import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "meg-pipeline.yaml", shards=3, weights="generator")
    return yaml.safe_load(path.read_text())


def _tasks(dag: dict) -> dict:
    return dag.get("dag", {}).get("tasks", {})


def test_every_stage_is_a_component_in_the_projects_image(spec):
    assert STAGE_COMPONENTS <= set(spec["components"])
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(STAGE_COMPONENTS)
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        command = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in command, f"{name} installs packages at run time"
        assert "from meg" in command  # a shim over the stage functions


def test_fit_fans_out_over_shards_and_merges(spec):
    comps = spec["components"]
    loop = next(c for c in comps.values() if "parameterIterator" in json.dumps(c.get("dag", {})) or
                any("parameterIterator" in t for t in _tasks(c).values()))
    assert loop
    text = json.dumps(spec)
    assert '"raw": "[0, 1, 2]"' in text or '[0, 1, 2]' in text
    for_task = next(t for c in comps.values() for t in _tasks(c).values() if "parameterIterator" in t)
    assert for_task["iteratorPolicy"]["parallelismLimit"] == 3
    merge = next(t for c in comps.values() for n, t in _tasks(c).items() if n == "fit-merge")
    assert "shards" in merge["inputs"]["artifacts"]


def test_the_generator_step_asks_for_a_gpu(spec):
    resources = spec["deploymentSpec"]["executors"]["exec-generator"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(resources["accelerator"]["resourceCount"]) == 1
    others = [k for k, ex in spec["deploymentSpec"]["executors"].items()
              if "accelerator" in ex["container"].get("resources", {})]
    assert others == ["exec-generator"]


def test_with_lookup_weights_no_step_asks_for_a_gpu(tmp_path):
    """generator.weights decides at compile time: with lookup the generator step trains nothing and gets no GPU;
    `meg pipeline compile` reads the setting from the params file, and the step is told what it was compiled for."""
    from meg import config
    from meg.cli import main

    specs = {}
    for weights in ("lookup", "generator"):
        values = config.default_params()
        values["generator"]["weights"] = weights
        (tmp_path / f"{weights}.yaml").write_text(yaml.safe_dump(values))
        out = tmp_path / f"{weights}-pipeline.yaml"
        assert main(["pipeline", "compile", "--params", str(tmp_path / f"{weights}.yaml"), "--out", str(out),
                     "--shards", "2"]) == 0
        specs[weights] = yaml.safe_load(out.read_text())
    for weights, spec in specs.items():
        executors = spec["deploymentSpec"]["executors"]
        with_gpu = [k for k, ex in executors.items() if "accelerator" in ex["container"].get("resources", {})]
        assert with_gpu == (["exec-generator"] if weights == "generator" else []), weights
        task = next(t for c in [spec["root"], *spec["components"].values()] for n, t in _tasks(c).items()
                    if n == "generator")
        assert task["inputs"]["parameters"]["compiled_for"]["runtimeValue"]["constant"] == weights
    with pytest.raises(ValueError, match="weights"):
        from pipeline.dag import build

        build(2, weights="nearest")


def test_the_generator_step_refuses_params_it_was_not_compiled_for(tmp_path):
    from meg import config
    from meg.errors import ConfigError
    from meg.stages import generator as stage

    values = config.default_params()
    values["generator"]["weights"] = "generator"
    view = config.stage_view(values, "generator")
    with pytest.raises(ConfigError, match="compiled for generator.weights 'lookup'"):
        stage.run(view, tmp_path, tmp_path, tmp_path, tmp_path / "out", compiled_for="lookup")


def test_an_exit_handler_closes_the_tracked_run(spec):
    root_tasks = _tasks(spec["root"])
    assert root_tasks["end-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"params", "data_dir", "cache_dir", "tracking_uri", "experiment", "generator_device"} == set(params)


def test_shards_must_be_positive():
    from pipeline.dag import build

    with pytest.raises(ValueError, match="shards"):
        build(0)


def test_pipeline_runs_end_to_end_with_the_local_runner(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow

    from meg.data import restore_raw_data
    from pipeline.local import run_local

    monkeypatch.delenv("MEG_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    restore_raw_data(tmp_path / "data")
    params = small_params(tiny_model_dir)
    write_params(tmp_path, params)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = run_local(tmp_path / "params.yaml", tmp_path / "kfp", shards=2, data_dir=tmp_path / "data",
                     cache_dir=tmp_path / "cache", tracking_uri=uri)
    decisions = list(root.rglob("decision.json"))
    assert len(decisions) == 1 and json.loads(decisions[0].read_text())["promoted"] is True
    assert len(list(root.rglob("bundle/manifest.json"))) == 1
    assert len(list((tmp_path / "cache" / "fit").rglob("part-*.safetensors"))) >= 1  # the shared per-edit cache

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["meg"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("meg.kind") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    stages = sorted(r.data.tags["meg.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id)
    assert stages == sorted(["prepare", "fit", "fit", "fit", "encoder", "router", "generator", "attach", "evaluate",
                             "promote"])
    assert any((tmp_path / "mlartifacts").rglob("calibration.json"))  # artifacts beside the database
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("meg-editor", "champion").version) == "1"
