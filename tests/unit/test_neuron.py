import pytest
import torch

from meg import lm, neuron

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")


def _batch(tok):
    return tok(["The capital of France is", "Hello there, my good friend", "One"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("act", neuron.ACTIVATIONS)
def test_zero_weights_are_bit_identical(tiny_models, tokenizer, family, act):
    m = tiny_models[family].model
    enc = _batch(tokenizer)
    base = m(**enc).logits
    with neuron.attached_neuron(m, 1, act) as n:
        n.set_weights(torch.zeros(3, neuron.weight_dim(lm.hidden_size(m))))
        out = m(**enc).logits
    assert torch.equal(base, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_only_changes_active_rows(tiny_models, tokenizer, family):
    m = tiny_models[family].model
    d = lm.hidden_size(m)
    enc = _batch(tokenizer)
    base = m(**enc).logits
    w = torch.zeros(3, neuron.weight_dim(d))
    w[1] = torch.randn(neuron.weight_dim(d))
    with neuron.attached_neuron(m, 2) as n:
        n.set_weights(w)
        out = m(**enc).logits
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])


def test_per_sample_weights_match_single_sample_runs(tiny_models, tokenizer):
    m = tiny_models["llama"].model
    d = lm.hidden_size(m)
    prompts = ["The capital of France is", "Hello there"]
    w = torch.randn(2, neuron.weight_dim(d)) * 0.3
    with neuron.attached_neuron(m, 1) as n:
        singles = []
        for i, p in enumerate(prompts):
            n.set_weights(w[i : i + 1])
            singles.append(m(**tokenizer([p], return_tensors="pt")).logits[0, -1])
        n.set_weights(w)
        batched = m(**tokenizer(prompts, return_tensors="pt", padding=True)).logits[:, -1]
    for i in range(2):
        assert torch.allclose(singles[i], batched[i], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_restored_after_exception(tiny_models, family):
    m = tiny_models[family].model
    original = lm.ffn_module(m, 1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with neuron.attached_neuron(m, 1) as n:
            assert lm.ffn_module(m, 1) is n
            raise RuntimeError("boom")
    assert lm.ffn_module(m, 1) is original
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_nested_attachment_refused(tiny_models):
    m = tiny_models["llama"].model
    with neuron.attached_neuron(m, 1):
        with pytest.raises(RuntimeError, match="already"):
            with neuron.attached_neuron(m, 1):
                pass
    assert not isinstance(lm.ffn_module(m, 1), neuron.DynamicNeuron)


def test_pack_unpack_and_shapes():
    k, v, b = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4)
    w = neuron.pack(k, v, b)
    assert w.shape == (4, neuron.weight_dim(8))
    k2, v2, b2 = neuron.unpack(w, 8)
    assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(b, b2)
    with pytest.raises(ValueError):
        neuron.unpack(torch.zeros(2, 5), 8)


def test_wrong_batch_size_is_an_error(tiny_models, tokenizer):
    m = tiny_models["llama"].model
    with neuron.attached_neuron(m, 1) as n:
        n.set_weights(torch.ones(5, neuron.weight_dim(lm.hidden_size(m))))
        with pytest.raises(ValueError, match="5 samples"):
            m(**_batch(tokenizer))


def test_shared_init_is_deterministic():
    assert torch.equal(neuron.shared_init(16, seed=3), neuron.shared_init(16, seed=3))
    assert not torch.equal(neuron.shared_init(16, seed=3), neuron.shared_init(16, seed=4))
