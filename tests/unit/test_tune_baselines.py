"""bench.tune_baselines sweep: z stored ahead by shards, settings chosen at the edited size."""

import json

import pytest
import torch

GRID = [{"layers": [0, 1], "mom2_weight": 1.0, "progress": False,
         "target": {"steps": 2, "n_prefixes": 1, "prefix_tokens": 2},
         "corpus": {"n_sampled": 2, "sample_tokens": 4, "n_train_records": 8, "batch_size": 2}}]


@pytest.fixture
def tiny_dir(tmp_path, tiny_models, tokenizer, monkeypatch):
    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))  # after the tokenizer is loaded from the real cache
    path = tmp_path / "tiny"
    tiny_models["llama"].model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_shards_store_the_z_the_sweep_then_uses_and_it_asks_the_first_edits_only(tiny_dir, tmp_path, monkeypatch):
    from bench import tune_baselines
    from meg.baselines import targets
    from meg.fit import WeightStore

    out = tmp_path / "sweep.json"
    common = ["sweep", "--method", "memit", "--model", str(tiny_dir), "--n-edits", "4", "--out", str(out)]
    for i in range(2):
        assert tune_baselines.main(common + ["--grid", json.dumps(GRID), "--fit-shard", f"{i}/2"]) == 0
    assert not out.exists()  # a shard only stores z
    stores = {p.parent for p in (tmp_path / "home" / "baselines" / "z").glob("*/part-*.safetensors")}
    assert len(stores) == 1
    keys = [e.content_key for e in tune_baselines.pseudo_edits(4)]
    assert sorted(WeightStore(stores.pop()).load()) == sorted(keys)  # every pseudo-edit once

    def no_optimising(*a, **kw):
        raise AssertionError("a z was optimised again")

    monkeypatch.setattr(targets, "_optimise", no_optimising)
    grid = GRID + [{**GRID[0], "mom2_weight": 100.0}]  # two lambdas, one z
    assert tune_baselines.main(common + ["--grid", json.dumps(grid), "--eval-edits", "2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["overrides"]["mom2_weight"] for r in rows] == [1.0, 100.0]
    assert all(r["n_edits"] == 4 and r["n_evaluated"] == 2 for r in rows)
    assert "4 (2 asked)" in tune_baselines.report(out)
    # the same settings at another evaluated size are a new row, not a skipped one
    assert tune_baselines.main(common + ["--grid", json.dumps(GRID[:1]), "--eval-edits", "1"]) == 0
    assert [r["n_evaluated"] for r in json.loads(out.read_text())["rows"]] == [2, 2, 1]


def test_grace_shards_store_the_values_the_sweep_then_uses(tiny_dir, tmp_path, monkeypatch):
    from bench import tune_baselines
    from meg.baselines import grace

    out = tmp_path / "sweep.json"
    grid = json.dumps([{"layer": 2, "eps_init": 0.5, "steps": 3, "progress": False}])
    common = ["sweep", "--method", "grace", "--model", str(tiny_dir), "--n-edits", "4", "--out", str(out), "--grid", grid]
    for i in range(2):
        assert tune_baselines.main(common + ["--fit-shard", f"{i}/2"]) == 0
    assert not out.exists()  # a shard only stores values

    def no_training(*a, **kw):
        raise AssertionError("a stored value was trained again")

    monkeypatch.setattr(grace, "_fit_chunk", no_training)
    assert tune_baselines.main(common + ["--eval-edits", "2"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["n_edits"] == 4 and row["extra"]["entries"] >= 2


def test_bad_sweep_arguments_are_refused_clearly(tiny_dir, tmp_path, capsys):
    from bench import tune_baselines

    out = tmp_path / "sweep.json"
    common = ["sweep", "--model", str(tiny_dir), "--out", str(out), "--grid", json.dumps(GRID)]
    assert tune_baselines.main(common + ["--method", "memit", "--n-edits", "4", "--eval-edits", "5"]) == 2
    assert "--eval-edits must be in 1..4" in capsys.readouterr().err
    assert tune_baselines.main(common + ["--method", "memit", "--n-edits", "1001"]) == 2
    assert "the held-out train records are 1000" in capsys.readouterr().err
    assert tune_baselines.main(common + ["--method", "memit", "--fit-shard", "2/2"]) == 2
    assert "bad shard" in capsys.readouterr().err
    assert not out.exists()


def test_trace_noise_is_measured_on_what_the_embedding_module_outputs(tiny_models):
    from bench.tune_baselines import embedding_std

    for family in ("llama", "gemma3"):
        model = tiny_models[family].model
        emb = model.get_input_embeddings()
        scale = float(getattr(emb, "embed_scale", 1.0))  # Gemma scales inside the module
        assert (family == "gemma3") == (scale > 1.0)
        assert embedding_std(model) == pytest.approx(float(emb.weight.std()) * scale, rel=0.05)


def test_damage_measures_each_layer_alone_then_all_and_leaves_the_model_as_it_was(tiny_dir, tmp_path, capsys):
    from bench import tune_baselines
    from meg import lm
    from meg.errors import ConfigError

    out = tmp_path / "damage.json"
    over = {k: v for k, v in GRID[0].items() if k != "mom2_weight"}
    common = ["damage", "--method", "memit", "--model", str(tiny_dir), "--n-edits", "4", "--out", str(out)]
    loaded = lm.load_model(str(tiny_dir))
    before = {l: lm.out_proj_weight(loaded.model, l).clone() for l in (0, 1)}
    res = tune_baselines.layer_damage(loaded, "memit", {**over, "mom2_weight": 1e-3}, 4, n_probes=3)
    assert all(torch.equal(lm.out_proj_weight(loaded.model, l), w) for l, w in before.items())
    assert [r["layers"] for r in res["rows"]] == [[0], [1], [0, 1]] and res["n_probes"] == 3
    assert all(r["kl"] >= 0 and 0 <= r["top1_kept"] <= 100 for r in res["rows"])
    assert all(r["update_over_weight"] > 0 and r["ffn_out_change"] > 0 for r in res["rows"][:2])
    # a far larger lambda writes a smaller update, and so harms less
    weak = tune_baselines.layer_damage(loaded, "memit", {**over, "mom2_weight": 1e6}, 4, n_probes=3)
    assert weak["rows"][-1]["kl"] < res["rows"][-1]["kl"]
    assert all(w["update_over_weight"] < r["update_over_weight"] for w, r in zip(weak["rows"][:2], res["rows"][:2]))
    assert tune_baselines.main(common + ["--overrides", json.dumps(over)]) == 0
    assert len(json.loads(out.read_text())["rows"]) == 3
    assert tune_baselines.main(common + ["--overrides", "[1]"]) == 2
    assert "--overrides" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="grace"):
        tune_baselines.layer_damage(loaded, "grace", {}, 4)
