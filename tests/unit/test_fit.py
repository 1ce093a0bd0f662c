import pytest
import torch

from meg import evaluate, fit, lm, neuron, textbatch
from tests.conftest import make_edit

EDITS = [
    ("The capital of France is", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("Toko Yasuda plays the", "piano"),
    ("The Eiffel Tower is located in", "Berlin"),
    ("Apple was founded by", "Bill Gates"),
    ("The official language of Brazil is", "Swedish"),
]


def _edits():
    return [make_edit(i, p, t) for i, (p, t) in enumerate(EDITS)]


def _cfg(**kw):
    # Tiny random models cannot always put two answer positions right with one neuron: no suffix here.
    base = dict(layer=2, optimizer="adam", lr=0.3, max_steps=150, chunk_size=4, suffix="")
    base.update(kw)
    return fit.FitConfig(**base)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_replay_matches_full_forward(tiny_models, tokenizer, family):
    m = tiny_models[family].model
    batch = textbatch.encode(tokenizer, [p for p, _ in EDITS], [t for _, t in EDITS], "\n")
    d = lm.hidden_size(m)
    w = torch.randn(len(EDITS), neuron.weight_dim(d)) * 0.2
    with neuron.attached_neuron(m, 2) as n:
        n.set_weights(w)
        full = textbatch.logits_at(m, batch)
        holder = {"h": fit.layer_inputs(m, 2, batch)}
        with fit.replay_from(m, 2, holder):
            replayed = textbatch.logits_at(m, batch)
    assert torch.allclose(full, replayed, atol=1e-5)
    assert all(not isinstance(layer, fit._Skip) for layer in lm.decoder_layers(m))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
@pytest.mark.parametrize("layer", [1, 3])
def test_cached_layer_output_plus_neuron_matches_full_forward(tiny_models, tokenizer, family, layer):
    m = tiny_models[family].model
    batch = textbatch.encode(tokenizer, [p for p, _ in EDITS], [t for _, t in EDITS], "\n")
    d = lm.hidden_size(m)
    w = torch.randn(len(EDITS), neuron.weight_dim(d)) * 0.2
    with neuron.attached_neuron(m, layer) as n:
        n.set_weights(w)
        full = textbatch.logits_at(m, batch)
    x, f, h = fit.layer_states(m, layer, batch)
    k, v, b = neuron.unpack(w, d)
    delta = (torch.einsum("rtd,rd->rt", x, k) + b[:, None]).unsqueeze(-1) * v[:, None, :]
    holder = {"h": fit.with_ffn_delta(m, layer, f, h, delta)}
    with fit.replay_from(m, layer + 1, holder):  # layer 3 is the last: only the final norm and head run
        replayed = textbatch.logits_at(m, batch)
    assert torch.allclose(full, replayed, atol=1e-5)
    assert all(not isinstance(block, fit._Skip) for block in lm.decoder_layers(m))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_last_ffn_at_scored_positions_keeps_their_logits_and_gradients(tiny_models, tokenizer, family):
    m = tiny_models[family].model
    batch = textbatch.encode(tokenizer, [p for p, _ in EDITS], [t for _, t in EDITS], "\n")
    start = fit.layer_inputs(m, 2, batch)

    def run(restrict):
        h = start.clone().requires_grad_(True)
        holder = {"h": h}
        if restrict:
            holder["rows"], holder["cols"] = batch.rows, batch.cols
        with fit.replay_from(m, 2, holder), fit.last_ffn_at(m, holder):
            logits = textbatch.logits_at(m, batch)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), h.grad

    full, grad_full = run(False)
    picked, grad_picked = run(True)
    assert torch.allclose(full, picked, atol=1e-5)
    assert torch.allclose(grad_full, grad_picked, atol=1e-5)
    assert not lm.ffn_module(m, -1)._forward_hooks and not lm.ffn_module(m, -1)._forward_pre_hooks


def test_candidate_vocabulary_fits_like_the_whole_vocabulary(tiny_models):
    loaded = tiny_models["llama"]
    edits = _edits()
    whole = fit.fit_edits(loaded, edits, _cfg(), progress=False)
    cand = fit.fit_edits(loaded, edits, _cfg(head_candidates=8, head_refresh=4), progress=False)
    assert cand.success.float().mean() >= whole.success.float().mean() - 1 / len(edits), (cand.report(), whole.report())
    # success is always decided on the whole vocabulary: the fitted weights reproduce the target there
    batch = textbatch.encode(loaded.tokenizer, [e.prompt for e in edits], [e.target_new for e in edits], "")
    with neuron.attached_neuron(loaded.model, 2) as n:
        n.set_weights(cand.weights)
        logits = textbatch.logits_at(loaded.model, batch)
    ok = textbatch.per_row_all(logits.argmax(-1) == batch.labels, batch.owner, len(edits))
    assert torch.equal(ok, cand.success)
    assert fit.FitConfig().key("h", 2) == fit.FitConfig(head_refresh=3).key("h", 2)  # inert without candidates
    assert fit.FitConfig().key("h", 2) != fit.FitConfig(head_candidates=8).key("h", 2)


# Gemma-3 is left out here: its random tiny model's scaled embeddings swamp a single neuron; the
# replay test above covers its code path and the integration tests cover real models.
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_fitted_edits_reproduce_targets_by_greedy_decoding(tiny_models, family):
    loaded = tiny_models[family]
    edits = _edits()
    res = fit.fit_edits(loaded, edits, _cfg(), progress=False)
    assert res.success.float().mean() >= 0.6, res.report()
    weights = res.weights

    def weights_fn(prompts):
        idx = [[e.prompt for e in edits].index(p) for p in prompts]
        return weights[idx], torch.ones(len(idx), dtype=torch.bool)

    edited = evaluate.EditedLM(loaded, weights_fn, layer=2)
    outs = edited.generate([e.prompt for e in edits], max_new_tokens=6)
    for ok, out, e in zip(res.success.tolist(), outs, edits):
        # the success flag is exactly "greedy decoding starts with the target"
        assert out.strip().casefold().startswith(e.target_new.casefold()) == ok, (out, e.target_new, ok)
    assert lm.ffn_module(loaded.model, 2).__class__.__name__ != "DynamicNeuron"


def test_fitting_together_equals_fitting_alone(tiny_models):
    loaded = tiny_models["llama"]
    edits = _edits()[:3]
    # 5 steps, no finishing pass: 20 more Adam steps would amplify the rounding of differently shaped batches
    cfg = _cfg(max_steps=5, stop="margin", margin_ce=1e-9, finish_steps=0)
    together = fit.fit_edits(loaded, edits, cfg, progress=False)
    alone = torch.stack([fit.fit_edits(loaded, [e], cfg, progress=False).weights[0] for e in edits])
    assert torch.allclose(together.weights, alone, atol=1e-4)


def test_store_resumes_and_only_fits_new_edits(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    edits = _edits()
    first = fit.fit_edits(loaded, edits[:4], _cfg(), store_dir=tmp_path, progress=False)
    parts = list(tmp_path.rglob("part-*.safetensors"))
    second = fit.fit_edits(loaded, edits, _cfg(), store_dir=tmp_path, progress=False)
    assert torch.equal(second.weights[:4], first.weights)
    new_parts = set(tmp_path.rglob("part-*.safetensors")) - set(parts)
    assert len(new_parts) == 1  # only the two new edits were fitted, in one chunk
    # a part whose index was never written (interrupted) is ignored, not half-read
    torn = next(iter(new_parts))
    torn.with_suffix(".json").unlink()
    third = fit.fit_edits(loaded, edits, _cfg(), store_dir=tmp_path, progress=False)
    assert torch.equal(third.weights, second.weights)


def test_other_settings_do_not_reuse_the_store(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    a = _cfg().key(loaded.content_hash, 2)
    assert a != _cfg(lr=0.05).key(loaded.content_hash, 2)
    assert a != _cfg().key("other-model", 2)
    assert a == _cfg(chunk_size=16).key(loaded.content_hash, 2)


def test_failures_are_reported(tiny_models):
    res = fit.fit_edits(tiny_models["llama"], _edits(), _cfg(max_steps=1, lr=1e-6), progress=False)
    rep = res.report()
    assert rep["n_success"] < rep["n_edits"]
    assert len(rep["failed_ids"]) == rep["n_edits"] - rep["n_success"]


def test_bad_config_names_the_field():
    from meg.errors import ConfigError

    with pytest.raises(ConfigError, match="'optimizer'"):
        fit.FitConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="'lr'"):
        fit.FitConfig(lr=0)


def test_variant_rows_delay_stopping_but_success_is_the_prompt_row(tiny_models):
    loaded = tiny_models["llama"]
    edits = _edits()[:4]
    loose = fit.fit_edits(loaded, edits, _cfg(n_prefixes=2, prefix_tokens=3, min_variant_share=0.0), progress=False)
    strict = fit.fit_edits(loaded, edits, _cfg(n_prefixes=2, prefix_tokens=3, min_variant_share=1.0), progress=False)
    assert (loose.steps <= strict.steps).all() and loose.steps.sum() < strict.steps.sum()
    assert loose.success.float().mean() >= 0.75 and strict.success.float().mean() >= 0.75


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bfloat16_fitting_is_checked_and_finished_in_full_precision(tiny_models, family):
    loaded = tiny_models[family]
    edits = _edits()
    res = fit.fit_edits(loaded, edits, _cfg(dtype="bfloat16"), progress=False)
    assert next(loaded.model.parameters()).dtype == torch.float32  # the model itself is untouched
    assert res.success.float().mean() >= (0.6 if family == "llama" else 0.0), res.report()
    acc, _ = evaluate.EditedLM(loaded, _lookup(edits, res.weights), layer=2).score(
        [e.prompt for e in edits], [e.target_new for e in edits])
    # success is judged in float32: every edit reported successful is right in float32
    assert all(a == 1.0 for a, ok in zip(acc, res.success.tolist()) if ok)


def _lookup(edits, weights):
    prompts = [e.prompt for e in edits]

    def weights_fn(batch_prompts):
        return weights[[prompts.index(p) for p in batch_prompts]], torch.ones(len(batch_prompts), dtype=torch.bool)

    return weights_fn


def test_context_fallback_gives_subject_questions_only_to_edits_without_rewordings(tiny_models, monkeypatch):
    from dataclasses import replace

    from meg.augment import TemplateBank
    from meg.editor import pseudo_pool
    from meg.errors import ConfigError

    loaded = tiny_models["llama"]
    bank = TemplateBank.from_records(pseudo_pool([]))
    known = replace(make_edit(0, "The mother tongue of Danielle Darrieux is", "English"), subject="Danielle Darrieux")
    unknown = replace(make_edit(1, "What year did Sunnyside Hospital end?", "1962"), subject="Sunnyside Hospital")
    seen: list[list[str]] = []
    encode_ids = textbatch.encode_ids
    monkeypatch.setattr(fit.textbatch, "encode_ids",
                        lambda tok, prompts, *a, **kw: seen.append(list(prompts)) or encode_ids(tok, prompts, *a, **kw))

    def rows(**kw):
        seen.clear()
        fit.fit_edits(loaded, [known, unknown], _cfg(max_steps=2, n_variants=2, **kw), progress=False, bank=bank)
        return seen[0]

    off, on = rows(context_fallback=0), rows(context_fallback=3)
    assert off.count(unknown.prompt) == 1 and not [p for p in off if "Sunnyside" in p and p != unknown.prompt]
    extra = [p for p in on if "Sunnyside" in p and p != unknown.prompt]
    assert len(extra) == 3 and len(set(extra)) == 3  # questions on the subject from other relations
    darrieux = [p for p in on if "Darrieux" in p]
    assert darrieux == [p for p in off if "Darrieux" in p] and len(darrieux) == 3  # prompt + 2 rewordings, no more
    assert _cfg(n_variants=2, context_fallback=3).key("h", 2) != _cfg(n_variants=2, context_fallback=0).key("h", 2)
    assert _cfg(context_fallback=3).key("h", 2) == _cfg(context_fallback=0).key("h", 2)  # inert without n_variants
    # without rewordings asked for (n_variants 0) the fallback has nothing to stand in for
    seen.clear()
    fit.fit_edits(loaded, [unknown], _cfg(max_steps=2, context_fallback=3), progress=False, bank=bank)
    assert seen[0] == [unknown.prompt]
    with pytest.raises(ConfigError, match="template bank"):
        fit.fit_edits(loaded, [known], _cfg(n_variants=2, context_fallback=2), progress=False)


def test_keep_rows_hold_the_base_answer_on_the_subjects_other_relations(tiny_models, monkeypatch):
    from dataclasses import replace

    from meg.augment import TemplateBank
    from meg.editor import pseudo_pool

    loaded = tiny_models["llama"]
    bank = TemplateBank.from_records(pseudo_pool([]))
    known = replace(make_edit(0, "The mother tongue of Danielle Darrieux is", "English"), subject="Danielle Darrieux")
    unknown = replace(make_edit(1, "What year did Sunnyside Hospital end?", "1962"), subject="Sunnyside Hospital")
    keep = fit.keep_questions(known, bank, 2, taken=bank.variants(known.prompt, known.subject, 2, known.target_new))
    assert len(keep) == 2 and all("Danielle Darrieux" in q and q != known.prompt for q in keep)
    assert fit.keep_questions(known, bank, 2) == fit.keep_questions(known, bank, 2)  # deterministic
    batches = []
    encode_ids = textbatch.encode_ids
    monkeypatch.setattr(fit.textbatch, "encode_ids",
                        lambda tok, prompts, ids, **kw: batches.append((list(prompts), [list(t) for t in ids]))
                        or encode_ids(tok, prompts, ids, **kw))
    cfg = _cfg(n_variants=2, context_fallback=3, n_keep=2, finish_steps=0)
    res = fit.fit_edits(loaded, [known, unknown], cfg, progress=False, bank=bank)
    prompts, ids = next(b for b in batches if known.prompt in b[0])
    base = fit.base_first_tokens(loaded.model, loaded.tokenizer, keep)
    # the known edit's keep questions are scored towards the base model's own first token; the edit fitted
    # on other-relation questions (no rewording: context_fallback) gets no keep rows
    assert [ids[prompts.index(q)] for q in keep] == [[t] for t in base]
    assert len([q for q in prompts if "Sunnyside" in q]) == 4  # the prompt + 3 fallback questions only
    # an edit declared done keeps the base model's first answer token on its keep questions
    assert bool(res.success[0]), res.report()
    w = res.weights[0:1].expand(len(keep), -1)
    edited = evaluate.EditedLM(loaded, lambda ps: (w[: len(ps)], torch.ones(len(ps), dtype=torch.bool)), layer=2)
    assert [g[0] for g in edited.generate_ids(keep, max_new_tokens=1)] == base
    assert cfg.key("h", 2) != replace(cfg, n_keep=0).key("h", 2)
    assert fit.FitConfig().key("h", 2) == fit.FitConfig(n_keep=0).key("h", 2)


def test_finishing_pass_completes_failed_fits_on_the_prompt_alone_and_leaves_the_store(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    edits = _edits()
    raw = fit.fit_edits(loaded, edits, _cfg(max_steps=2, finish_steps=0), store_dir=tmp_path, progress=False)
    assert not raw.success.all() and raw.n_finished == 0
    # finish_steps is not part of the store's key: the stored fits are loaded and finished
    assert _cfg(max_steps=2, finish_steps=0).key("h", 2) == _cfg(max_steps=2, finish_steps=150).key("h", 2)
    done = fit.fit_edits(loaded, edits, _cfg(max_steps=2, finish_steps=150), store_dir=tmp_path, progress=False)
    assert done.success.sum() > raw.success.sum()
    assert done.n_finished == int(done.success.sum() - raw.success.sum()) == done.report()["n_finished"]
    kept = raw.success
    assert torch.equal(done.weights[kept], raw.weights[kept]) and torch.equal(done.steps[kept], raw.steps[kept])
    assert (done.steps[~kept] > raw.steps[~kept]).all()
    # the store still holds the fits themselves
    again = fit.fit_edits(loaded, edits, _cfg(max_steps=2, finish_steps=0), store_dir=tmp_path, progress=False)
    assert torch.equal(again.weights, raw.weights) and torch.equal(again.success, raw.success)
    # the finished neurons do state their targets
    edited = evaluate.EditedLM(loaded, _lookup(edits, done.weights), layer=2)
    for ok, out, e in zip(done.success.tolist(), edited.generate([e.prompt for e in edits], max_new_tokens=6), edits):
        assert out.strip().casefold().startswith(e.target_new.casefold()) == ok, (out, e.target_new, ok)
