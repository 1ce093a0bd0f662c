"""The stage functions chained with files in between, on a tiny random model (tracking off)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from meg import config, runner
from meg.errors import BundleError, ConfigError, FactsError
from meg.stages import fit as fit_stage
from tests.pipeline.conftest import write_params


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("MEG_TRACKING", "off")


def run(stage, root, **kw):
    return runner.run_stage(stage, root / "params.yaml", root, progress=False, **kw)


def add_facts(root, name: str, rows: list[dict]):
    from meg.factstore import FactStore
    from meg.stages.prepare import edit_set

    src = root / name
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.section_config(config.load_params(root / "params.yaml"), "prepare")
    current, _ = edit_set(cfg, root)
    return FactStore(root / "data" / "facts").add(src, current)


def test_whole_chain_writes_every_output_and_a_loadable_bundle(workspace):
    from meg.editor import EditedModel

    for stage in ("prepare", "fit", "encoder", "router", "generator", "attach", "evaluate"):
        result = run(stage, workspace)
        assert result.stage == stage
        assert (workspace / "artifacts" / stage / "metrics.json").is_file()
    art = workspace / "artifacts"
    edits = [json.loads(l) for l in (art / "prepare" / "edits.jsonl").read_text().splitlines()]
    assert len(edits) == 8 and all(e["id"].startswith("cf-") for e in edits)
    pool = (art / "prepare" / "pseudo.jsonl").read_text().splitlines()
    texts = {e["prompt"] for e in edits}
    assert len(pool) > 1000 and not any(json.loads(l)["prompt"] in texts for l in pool[:2000])
    labels = json.loads((art / "prepare" / "labels.json").read_text())
    assert len(labels["texts"]) == 8 and labels["model"] == str(config.load_params(workspace / "params.yaml")["base"]["model"])
    meta = json.loads((art / "fit" / "fit.json").read_text())
    assert meta["ids"] == [e["id"] for e in edits] and meta["layer"] == 2
    model = EditedModel.load(art / "attach" / "bundle")
    assert model.info["edit_ids"] == meta["ids"] and model.layer == 2
    metrics = json.loads((art / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"meg", "none"}
    assert metrics["none"]["loc_ag"] == 100.0  # the unedited model agrees with its own answers
    for name in ("comparison.png", "comparison.json", "records.jsonl", "report.json", "table.txt"):
        assert (art / "evaluate" / name).stat().st_size > 0
    history = json.loads((art / "generator" / "history.json").read_text())
    assert history and {"step", "loss", "error"} <= set(history[0])


def test_lookup_bundle_answers_the_edits_as_fitted(workspace, params):
    """With the fitted weights looked up (no generator), reliability is what fitting achieved."""
    params["generator"]["weights"] = "lookup"
    write_params(workspace, params)
    for stage in ("prepare", "fit", "encoder", "router", "generator", "attach", "evaluate"):
        run(stage, workspace)
    art = workspace / "artifacts"
    fitted = load_file(str(art / "fit" / "weights.safetensors"))
    routed = json.loads((art / "evaluate" / "router.json").read_text())
    metrics = json.loads((art / "evaluate" / "metrics.json").read_text())["meg"]
    assert json.loads((art / "generator" / "generator" / "absent.json").read_text()) == {"absent": "skipped: weights lookup"}
    assert json.loads((art / "generator" / "report.json").read_text())["trained"] is False
    assert json.loads((art / "generator" / "history.json").read_text()) == []
    assert routed["router_prompt_right_edit"] == 100.0
    # an edit fitted exactly has every target token right under teacher forcing
    assert metrics["rel_tf"] >= 100.0 * float(fitted["success"].float().mean()) - 1e-6


def test_fit_shards_merge_to_the_unsharded_result(workspace):
    run("prepare", workspace)
    run("fit", workspace)
    whole = load_file(str(workspace / "artifacts" / "fit" / "weights.safetensors"))
    shard_dirs = []
    for i in range(3):
        out = workspace / "shards" / str(i)
        res = run("fit", workspace, shard=(i, 3), out=out)
        assert res.metrics["n_fitted"] == 0  # every edit is in the per-edit cache already
        shard_dirs.append(out)
    sizes = [len(json.loads((d / "fit.json").read_text())["ids"]) for d in shard_dirs]
    assert sum(sizes) == 8
    merged_dir = workspace / "merged"
    runner.merge_fit(shard_dirs, workspace / "params.yaml", workspace, merged_dir)
    merged = load_file(str(merged_dir / "weights.safetensors"))
    for name in fit_stage.TENSORS:
        assert torch.equal(merged[name], whole[name]), name
    with pytest.raises(BundleError, match="in no shard"):
        fit_stage.merge(workspace / "artifacts" / "prepare", shard_dirs[:2], workspace / "m2")
    with pytest.raises(BundleError, match="also in another shard"):
        fit_stage.merge(workspace / "artifacts" / "prepare", shard_dirs + shard_dirs[:1], workspace / "m3")


def test_bad_shard_is_an_error():
    for text in ("3/3", "a/2", "1", "-1/2"):
        with pytest.raises(ConfigError, match="bad shard"):
            fit_stage.parse_shard(text)


def test_new_facts_fit_only_the_new_edits_and_warm_start_the_generator(workspace):
    for stage in ("prepare", "fit", "encoder", "router", "generator"):
        run(stage, workspace)
    first = json.loads((workspace / "artifacts" / "generator" / "report.json").read_text())
    assert first["warm_start"] is False
    from meg.facts import load_benchmark

    extra = load_benchmark("counterfact", "edit")[100:103]
    rows = [{"prompt": e.prompt, "target_new": e.target_new, "paraphrases": list(e.paraphrases),
             "locality_prompt": e.locality[0].prompt} for e in extra]
    # one more fact overrides an edit of the benchmark slice with a new target
    slice0 = load_benchmark("counterfact", "edit")[0]
    rows.append({"prompt": slice0.prompt, "target_new": "Klingon"})
    report = add_facts(workspace, "new.jsonl", rows)
    assert (report.n_new, report.n_override, report.n_duplicate) == (3, 1, 0)
    prep = run("prepare", workspace)
    assert prep.metrics["n_edits"] == 11 and prep.metrics["n_dropped"] == 1
    fit = run("fit", workspace)
    assert fit.metrics["n_fitted"] == 4 and fit.metrics["n_cached"] == 7
    run("router", workspace)
    gen = run("generator", workspace)
    second = json.loads((workspace / "artifacts" / "generator" / "report.json").read_text())
    assert second["warm_start"] is True and gen.metrics["steps"] <= 6  # generator.warm_max_steps
    # a change of settings trains from scratch, as a full rebuild would
    params = config.load_params(workspace / "params.yaml")
    params["generator"]["lr"] = 0.002
    write_params(workspace, params)
    run("generator", workspace)
    third = json.loads((workspace / "artifacts" / "generator" / "report.json").read_text())
    assert third["warm_start"] is False and "other settings" in third["warm_start_reason"]


def test_prepare_reports_duplicate_ids_across_the_store(workspace):
    report = add_facts(workspace, "a.jsonl", [{"id": "x1", "prompt": "The sky of Mars is", "target_new": "green"}])
    assert report.n_new == 1
    (workspace / "data" / "facts" / "0002-b.jsonl").write_text(
        json.dumps({"id": "x1", "prompt": "The moon of Earth is called", "target_new": "Selene"}) + "\n")
    with pytest.raises(FactsError, match="'x1' is also the id of"):
        run("prepare", workspace)


def test_missing_inputs_name_the_stage_to_run(workspace):
    with pytest.raises(BundleError, match="run the prepare stage first"):
        run("fit", workspace)
