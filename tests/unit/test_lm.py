import pytest

from meg import lm
from meg.errors import ModelSourceError


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_architecture_lookup(tiny_models, family):
    m = tiny_models[family].model
    assert lm.num_layers(m) == 4
    assert lm.hidden_size(m) == 64
    assert lm.ffn_module(m, 0) is not lm.ffn_module(m, 1)
    assert lm.ffn_activation_name(m)
    with pytest.raises(ValueError, match="out of range"):
        lm.ffn_module(m, 4)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="no such directory"):
        lm.load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        lm.load_model(str(tmp_path))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not reachable"):
        lm.load_model("some-org/some-model")


def test_unsupported_family(tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ModelSourceError, match="not supported"):
        lm.arch_of(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                              intermediate_size=32)))


def test_content_hash_tracks_weights(tmp_path, tiny_models):
    m = tiny_models["llama"].model
    m.save_pretrained(tmp_path / "a")
    h1 = lm.content_hash(tmp_path / "a")
    assert h1 == lm.content_hash(tmp_path / "a")
    f = next((tmp_path / "a").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert lm.content_hash(tmp_path / "a") != h1


def test_local_directory_loads(tmp_path, tiny_models, tokenizer):
    m = tiny_models["qwen2"].model
    m.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    loaded = lm.load_model(str(tmp_path / "q"))
    assert loaded.model.config.model_type == "qwen2"
    assert loaded.tokenizer.padding_side == "left"
    assert len(loaded.content_hash) == 64


def test_registry_model_is_dequantised_once_when_processes_race(tmp_path, monkeypatch):
    """Two loaders starting together on a fresh MEG_HOME: the second waits and takes the first's directory."""
    import threading
    import time

    monkeypatch.setenv("MEG_HOME", str(tmp_path))
    made, overlap, active = [], [], []

    def slow_dequantise(spec, out):
        active.append(1)
        overlap.append(len(active))
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        made.append(out)
        active.pop()

    monkeypatch.setattr(lm, "_dequantise", slow_dequantise)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(lm.resolve_model_dir("smollm2-135m")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and max(overlap) == 1
    assert results == [(tmp_path / "models" / "smollm2-135m", "smollm2-135m")] * 3
