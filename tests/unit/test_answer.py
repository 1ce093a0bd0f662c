"""Answering with a real (tiny) edit bundle: batching invariance, routing, explanations, HF-style generate.

The bundle was fitted on raw prompts, so these tests complete raw text (``chat=False``); chat answers are
tested in test_generation.py."""

from __future__ import annotations

import pytest
import torch

from meg.answer import AnswerConfig, answer_rows, base_answer_rows, generate_rows, newline_ids
from meg.errors import ConfigError
from tests.tiny_bundle import UNRELATED, tiny_bundle, tiny_edits, tiny_loaded


RAW = AnswerConfig(chat=False)


@pytest.fixture(scope="module")
def model():
    from meg.editor import EditedModel

    return EditedModel.load(tiny_bundle(), loaded=tiny_loaded())


@pytest.fixture(scope="module")
def questions():
    edits = tiny_edits()
    return [e.prompt for e in edits] + [e.paraphrases[0] for e in edits] + list(UNRELATED)


def test_edit_prompts_give_their_new_targets(model):
    edits = tiny_edits()
    out = model.answer([e.prompt for e in edits], chat=False)["answers"]
    hits = sum(a.startswith(e.target_new) for a, e in zip(out, edits))
    base = base_answer_rows(model.loaded, [e.prompt for e in edits], [False] * len(edits), RAW)[0]
    assert hits >= len(edits) // 2  # the tiny random model knows none of them
    assert sum(a.startswith(e.target_new) for a, e in zip(base, edits)) == 0


def test_one_batch_gives_the_same_answers_as_one_question_at_a_time(model, questions):
    batched = model.answer(questions, chat=False)["answers"]
    single = [model.answer([q], chat=False)["answers"][0] for q in questions]
    assert batched == single


def test_unrouted_questions_get_exactly_the_base_models_answer(model, questions):
    _, mask, _, _ = model.route(questions)
    assert not mask[-len(UNRELATED):].any()  # the unrelated questions are not routed
    edited = model.answer(questions, chat=False)["answers"]
    base, _ = base_answer_rows(model.loaded, questions, [False] * len(questions), RAW)
    for q, m, e, b in zip(questions, mask.tolist(), edited, base):
        if not m:
            assert e == b, q
    assert any(e != b for m, e, b in zip(mask.tolist(), edited, base) if m)  # routed ones do change


def test_explanations(model, questions):
    plain = model.answer(questions, chat=False)["answers"]
    out = model.answer(questions, explain=True, chat=False)
    assert out["answers"] == plain  # explaining changes no answer
    _, mask, _, conf = model.route(questions)
    base, _ = base_answer_rows(model.loaded, questions, [False] * len(questions), RAW)
    edits = tiny_edits()
    for i, (q, e) in enumerate(zip(questions, out["explanations"])):
        assert e["question"] == q and e["answer"] == plain[i] and e["base_answer"] == base[i]
        assert e["routed"] == (bool(mask[i]) or e["exact"]) and e["confidence"] == pytest.approx(float(conf[i]), abs=1e-4)
        assert e["exact"] == (q in {x.prompt for x in edits})
        expected = "exact" if e["exact"] else "routed" if e["routed"] else ("relation", "threshold", "no_subject")
        assert e["reason"] == expected if isinstance(expected, str) else e["reason"] in expected
        assert ("relation_cosine" in e) == ("relation_cut" in e)
        if e["reason"] == "relation":
            assert e["relation_cosine"] < e["relation_cut"]
        assert len(e["nearest_edits"]) == 3
        sims = [n["similarity"] for n in e["nearest_edits"]]
        assert sims == sorted(sims, reverse=True)
    for i, edit in enumerate(edits):  # an edit prompt's nearest edit is itself, with its text
        top = out["explanations"][i]["nearest_edits"][0]
        assert (top["id"], top["prompt"], top["target_new"]) == (edit.id, edit.prompt, edit.target_new)
        assert top["similarity"] == pytest.approx(1.0, abs=1e-3)


def test_explain_flags_per_question(model, questions):
    flags = [i % 3 == 0 for i in range(len(questions))]
    answers, expl = answer_rows(model, questions, flags, RAW)
    assert answers == model.answer(questions, chat=False)["answers"]
    assert [e is not None for e in expl] == flags
    with pytest.raises(ValueError, match="explain flags"):
        answer_rows(model, questions, flags[:-1])
    assert answer_rows(model, [], []) == ([], [])


def test_stopping_at_the_first_newline_changes_no_answer(model, questions):
    stop = model.answer(questions, stop_at_newline=True, chat=False)["answers"]
    full = model.answer(questions, stop_at_newline=False, chat=False)["answers"]
    assert stop == full
    nl = newline_ids(model.loaded.tokenizer)
    assert all("\n" in model.loaded.tokenizer.decode([int(i)]) for i in nl[:20])


def test_generate_like_transformers_routes_each_row(model):
    tok = model.loaded.tokenizer
    prompts = [tiny_edits()[2].prompt, UNRELATED[0]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=6)
    assert isinstance(ids, torch.Tensor) and ids.shape == (2, enc.input_ids.shape[1] + 6)
    assert torch.equal(ids[:, : enc.input_ids.shape[1]], enc.input_ids)  # the prompt comes back first
    base = model.loaded.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(ids[1], base[1])  # the unrelated row runs the base model
    assert not torch.equal(ids[0], base[0])  # the edited row does not
    assert tok.decode(ids[0, enc.input_ids.shape[1]:]).startswith(" " + tiny_edits()[2].target_new)
    # a positional tensor works too, and so do sampling options that expand the batch
    assert torch.equal(model.generate(enc.input_ids, 6, attention_mask=enc.attention_mask), ids)
    torch.manual_seed(0)
    sampled = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=4,
                             do_sample=True, num_return_sequences=3)
    assert sampled.shape[0] == 6


def test_generate_on_text_keeps_the_harness_contract(model):
    from meg.evaluate import EditedLM

    prompts = [tiny_edits()[2].prompt, UNRELATED[0]]
    texts = model.generate(prompts, 6)
    assert texts == EditedLM.generate(model, prompts, 6) and all(isinstance(t, str) for t in texts)
    assert model.generate(prompts[0], 6) == texts[:1]
    greedy = model.generate(prompts, 6, do_sample=False)  # transformers options on text: text back
    assert greedy == texts


def test_base_rows_and_generate_rows_agree(model, questions):
    tok = model.loaded.tokenizer
    ids = generate_rows(model.loaded, questions[-3:], max_new_tokens=5)
    answers, expl = base_answer_rows(model.loaded, questions[-3:], [True, False, True],
                                     AnswerConfig(max_new_tokens=5, stop_at_newline=False, chat=False))
    assert answers == [tok.decode(r, skip_special_tokens=True).split("\n")[0].strip() for r in ids]
    assert expl[1] is None and expl[0]["routed"] is False and expl[0]["base_answer"] == answers[0]


def test_answer_config_is_checked():
    with pytest.raises(ConfigError, match="'max_new_tokens'"):
        AnswerConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="'top_k'"):
        AnswerConfig(top_k=-1)
    with pytest.raises(ConfigError, match="'stop_at_newline'"):
        AnswerConfig(stop_at_newline="yes")


def test_speed_options(model, questions):
    from meg.answer import edit_weights, question_weights

    edits = tiny_edits()
    n = len(edits)
    default_w, default_mask = model.weights_fn(questions)
    steps = model.generator.config.sample_steps
    w, mask = question_weights(model, questions, AnswerConfig(sample_steps=steps))  # the bundle's steps: same
    assert torch.equal(mask, default_mask) and torch.allclose(w, default_w, atol=1e-5)
    cached = edit_weights(model)
    assert cached.shape == (n, model.w0.numel()) and edit_weights(model) is cached  # computed once
    w, mask = question_weights(model, questions, AnswerConfig(weight_cache="edit"))
    assert torch.equal(mask, default_mask)
    assert torch.equal(w[:n], default_w[:n])  # an edit prompt gets its fitted weights either way (exact_prompts)
    _, _, nearest, _ = model.route(questions)
    exact = torch.tensor([q in {e.prompt for e in edits} for q in questions])
    generated = (mask & ~exact).nonzero().flatten()
    assert torch.equal(w[generated], cached[nearest[generated]]) and not w[~mask].any()
    assert torch.equal(w[exact], model.lookup[nearest[exact]])  # edit prompts: their fitted weights
    plain = model.answer(questions, chat=False)["answers"]
    fast = model.answer(questions, weight_cache="edit", chat=False)["answers"]
    assert fast[:n] == plain[:n] and fast[2 * n:] == plain[2 * n:]  # edit prompts and unrelated: unchanged
    few = model.answer(questions, sample_steps=2, chat=False)["answers"]
    assert few[2 * n:] == plain[2 * n:]
    with pytest.raises(ConfigError, match="'weight_cache'"):
        AnswerConfig(weight_cache="query")
    with pytest.raises(ConfigError, match="'sample_steps'"):
        AnswerConfig(sample_steps=0)
