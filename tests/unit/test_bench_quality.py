"""bench.quality --fit-shard: shards that together fit every edit once into the shared store."""

import pytest


def test_fit_shards_fill_the_store_once_and_the_errors_are_clear(tmp_path, tiny_models, tokenizer, capsys):
    from bench.quality import main
    from meg.facts import load_benchmark
    from meg.fit import WeightStore

    model_dir = tmp_path / "tiny"
    tiny_models["llama"].model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    work = tmp_path / "w"
    common = ["--dataset", "counterfact", "--n-edits", "6", "--methods", "meg", "--model", str(model_dir),
              "--work-dir", str(work), "--set", "fit.max_steps=3,fit.n_variants=1,fit.context_fallback=0,rewrite.source=frames"]
    for i in range(2):
        assert main(common + ["--fit-shard", f"{i}/2"]) == 0
    parts = list((work / "fit").glob("*/part-*.safetensors"))
    assert parts and len({p.parent for p in parts}) == 1  # one store: both shards fitted with the same settings
    fitted = WeightStore(parts[0].parent).load()
    keys = [e.content_key for e in load_benchmark("counterfact", "edit")[:6]]
    # every edit once, in one shard or the other (stored under its content key and the hash of its fitted texts)
    assert sorted(k.split("-")[0] for k in fitted) == sorted(keys)
    assert all(int(w["steps"]) <= 3 for w in fitted.values())  # --set applied (the default cap is 60)

    assert main(common + ["--fit-shard", "2/2"]) == 2
    assert "bad shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common[:-4] + ["--fit-shard", "0/2"])  # no --work-dir
    assert "--fit-shard needs --work-dir" in capsys.readouterr().err


def test_memit_shards_store_every_z_once(tmp_path, tiny_models, tokenizer, monkeypatch, capsys):
    from bench.quality import main
    from meg.facts import load_benchmark
    from meg.fit import WeightStore

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))  # after the tokenizer is loaded from the real cache
    model_dir = tmp_path / "tiny"
    tiny_models["llama"].model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--dataset", "counterfact", "--n-edits", "4", "--model", str(model_dir)]
    for i in range(2):
        assert main(common + ["--methods", "none,memit,alphaedit", "--fit-shard", f"{i}/2"]) == 0
    stores = {p.parent for p in (tmp_path / "home" / "baselines" / "z").glob("*/part-*.safetensors")}
    assert len(stores) == 1  # MEMIT and AlphaEdit share z (same layers and settings in the registry defaults)
    keys = [e.content_key for e in load_benchmark("counterfact", "edit")[:4]]
    assert sorted(WeightStore(stores.pop()).load()) == sorted(keys)
    with pytest.raises(SystemExit):
        main(common + ["--methods", "none,ft", "--fit-shard", "0/2"])
    assert "none is in --methods" in capsys.readouterr().err


def test_grace_shards_store_every_value_once(tmp_path, tiny_models, tokenizer, monkeypatch):
    from bench.quality import main
    from meg.fit import WeightStore

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))  # after the tokenizer is loaded from the real cache
    model_dir = tmp_path / "tiny"
    tiny_models["llama"].model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["--dataset", "counterfact", "--n-edits", "5", "--model", str(model_dir), "--methods", "grace"]
    for i in range(2):
        assert main(common + ["--fit-shard", f"{i}/2"]) == 0
    stores = {p.parent for p in (tmp_path / "home" / "baselines" / "grace").glob("*/part-*.safetensors")}
    assert len(stores) == 1  # both shards built the same codebook from all five edits
    entries = sorted(int(k.split("-")[1]) for k in WeightStore(stores.pop()).load())
    assert entries == list(range(len(entries))) and len(entries) >= 2  # every entry once, from both shards
