"""Weight sources (meg.sources) on hand-made routed batches: which rows get which weights, and the factory."""

import pytest
import torch

from meg import sources
from meg.editor import MegConfig
from meg.errors import BundleError, ConfigError
from meg.sources import DiffusionSource, LookupSource, RoutedBatch

P = 5
LOOKUP = torch.arange(3 * P, dtype=torch.float32).reshape(3, P) + 1  # three edits' fitted weights
PROMPTS = ["The capital of France is", "Toko Yasuda plays the", "The Eiffel Tower is located in"]


class FakeGenerator:
    """Samples a row from its condition alone: the condition's sum, plus the step count, in every column."""

    def __init__(self):
        self.calls = []

    def sample(self, cond, steps=None, seed=0):
        self.calls.append((cond.shape[0], steps, seed))
        return cond.sum(dim=1, keepdim=True).expand(-1, P) + (steps or 0) + 1000 * seed


def batch(queries, mask, nearest, exact=()):
    emb = torch.arange(len(queries) * 2, dtype=torch.float32).reshape(len(queries), 2)
    return RoutedBatch(list(queries), emb, torch.tensor(mask), torch.tensor(nearest), set(exact))


def test_lookup_gives_routed_rows_their_edits_fitted_weights():
    src = LookupSource(LOOKUP)
    b = batch(["a", "b", "c", "d"], [True, False, True, True], [2, 0, 0, 2])
    w = src.weights(b)
    assert w.shape == (4, P)
    assert torch.equal(w[0], LOOKUP[2]) and torch.equal(w[2], LOOKUP[0]) and torch.equal(w[3], LOOKUP[2])
    assert not w[1].any()  # not routed: no neuron
    assert torch.equal(src.weights(b, steps=2, per_edit=True), w)  # the speed options change nothing here
    assert src.exact_edits(PROMPTS) == {}  # an edit's own prompt is no special case: every routed row is fitted
    assert src.label == "MeG, lookup weights" and not src.trains_generator
    with pytest.raises(BundleError, match="lookup"):
        LookupSource(None)


def test_diffusion_samples_routed_rows_and_gives_exact_rows_their_fitted_weights():
    gen = FakeGenerator()
    edit_emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    src = DiffusionSource(gen, P, sample_seed=0, edit_emb=edit_emb, lookup=LOOKUP, edit_prompts=PROMPTS,
                          exact_prompts=True)
    queries = ["  the CAPITAL of france  is", "Where is the Eiffel Tower?", "unrelated", "Toko Yasuda plays the"]
    exact = src.exact_edits(queries)
    assert exact == {0: 0, 3: 1}  # normalised case and spacing
    b = batch(queries, [True, True, False, True], [0, 2, 1, 1], exact)
    w = src.weights(b)
    assert torch.equal(w[0], LOOKUP[0]) and torch.equal(w[3], LOOKUP[1])
    assert torch.equal(w[1], b.emb[1].sum().expand(P))  # generated from the query's own condition
    assert not w[2].any()
    assert gen.calls == [(1, None, 0)]  # only the one generated row was sampled

    fewer = src.weights(b, steps=3)
    assert torch.equal(fewer[1], b.emb[1].sum().expand(P) + 3) and torch.equal(fewer[0], w[0])
    per_edit = src.weights(b, per_edit=True)  # the nearest edit's weights, sampled from its prompt
    assert torch.equal(per_edit[1], edit_emb[2].sum().expand(P)) and torch.equal(per_edit[3], LOOKUP[1])
    assert src.edit_weights() is src.edit_weights()  # computed once per step count
    n_calls = len(gen.calls)
    src.prepare(steps=4, per_edit=True)
    assert len(gen.calls) == n_calls + 1 and src.edit_weights(4) is src.edit_weights(4)
    assert src.label == "MeG, generated weights" and src.trains_generator


def test_diffusion_without_exact_prompts_generates_every_routed_row():
    src = DiffusionSource(FakeGenerator(), P, lookup=LOOKUP, edit_prompts=PROMPTS, exact_prompts=False)
    assert src.exact_edits(PROMPTS) == {}
    b = batch(PROMPTS, [True, True, True], [0, 1, 2])
    assert torch.equal(src.weights(b), b.emb.sum(dim=1, keepdim=True).expand(-1, P))
    with pytest.raises(BundleError, match="exact_prompts"):
        DiffusionSource(FakeGenerator(), P, lookup=LOOKUP, exact_prompts=True)  # no edit prompts
    with pytest.raises(BundleError, match="generator"):
        DiffusionSource(None, P)


def test_the_weights_setting_chooses_the_source_once():
    lookup_cfg, gen_cfg = MegConfig(weights="lookup"), MegConfig(weights="generator", sample_seed=3)
    assert sources.source_class(lookup_cfg) is LookupSource and sources.source_class(gen_cfg) is DiffusionSource
    parts = dict(generator=FakeGenerator(), lookup=LOOKUP, edit_prompts=PROMPTS)
    src = sources.weight_source(lookup_cfg, P, **parts)
    assert isinstance(src, LookupSource) and not hasattr(src, "generator")  # what it does not use is dropped
    src = sources.weight_source(gen_cfg, P, **parts)
    assert isinstance(src, DiffusionSource) and src.sample_seed == 3 and src.exact_edits(PROMPTS[:1]) == {0: 0}
    # what a bundle keeps: the fitted weights for lookup; for generated weights with exact_prompts, also the prompts
    assert LookupSource.kept(lookup_cfg, LOOKUP, PROMPTS) == (LOOKUP, None)
    assert DiffusionSource.kept(gen_cfg, LOOKUP, PROMPTS) == (LOOKUP, PROMPTS)
    no_exact = MegConfig(weights="generator", exact_prompts=False)
    assert DiffusionSource.kept(no_exact, LOOKUP, PROMPTS) == (None, None)
    with pytest.raises(ConfigError, match="'weights'"):
        MegConfig(weights="nearest")
