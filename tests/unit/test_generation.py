"""The one generation path (meg.generation): chat rendering, stop rules, and the neuron switched off once answered."""

from __future__ import annotations

import torch

from meg import generation, neuron


def test_states_matches_whole_words_case_folded():
    assert generation.states("Her mother tongue is English.", "english")
    assert generation.states("It is  New   York City", "New York")
    assert not generation.states("Englishman", "English")
    assert not generation.states("anything", "  ")


def test_chat_prompt_is_a_user_turn_ready_for_the_answer(tokenizer):
    text = generation.chat_prompt(tokenizer, "The mother tongue of Ann Roe is")
    assert "<|im_start|>user\nThe mother tongue of Ann Roe is<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert generation.turn_end_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert generation.last_user_turn([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}]) == "c"


def test_release_switches_a_row_off_once_it_states_its_target(tiny_models):
    """The criterion never stops a row; it takes a row's neuron away when the row's text states its target."""
    loaded = tiny_models["llama"]
    tok = loaded.tokenizer
    d = loaded.model.config.hidden_size
    w = torch.randn(3, neuron.weight_dim(d))
    with neuron.attached_neuron(loaded.model, 1) as mod:
        mod.set_weights(w, torch.tensor([True, True, False]))
        prompt = tok(["x"], return_tensors="pt").input_ids
        rows = [tok(" Paris is nice", add_special_tokens=False).input_ids,
                tok(" London calling", add_special_tokens=False).input_ids,
                tok(" Paris", add_special_tokens=False).input_ids]
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.cat([prompt[0], torch.tensor(r + [0] * (width - len(r)))]) for r in rows])
        crit = generation._Release(tok, prompt.shape[1], mod, w, torch.tensor([True, True, False]),
                                   ["Paris", "Paris", "Paris"])
        assert not crit(ids, None).any()
        assert mod.rows.tolist() == [1]  # row 0 stated its target; row 1 did not; row 2 had no neuron


def test_generation_with_release_leaves_unreleased_rows_as_without(tiny_models):
    """A release text that is never stated changes nothing; one stated at once gives the base model's answer
    from then on (here: every token after the first)."""
    loaded = tiny_models["llama"]
    d = loaded.model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, neuron.weight_dim(d), generator=g) * 3
    prompts = ["The capital of France is", "Water boils at"]
    plain = generation.generate_ids(loaded, prompts, w, None, 1, max_new_tokens=6)
    never = generation.generate_ids(loaded, prompts, w, None, 1, max_new_tokens=6, release=["zzqx", "zzqx"])
    assert plain == never
    first = [loaded.tokenizer.decode(r[:1]) for r in plain]
    released = generation.generate_ids(loaded, prompts, w, None, 1, max_new_tokens=6,
                                       release=[t.strip() or "zzqx" for t in first])
    assert [r[:1] for r in released] == [r[:1] for r in plain]  # the first token is still the neuron's
    base = generation.generate_ids(loaded, prompts, None, None, None, max_new_tokens=6)
    assert any(a != b for a, b in zip(released, plain)) or plain == base


def test_chat_answers_route_on_the_question_not_the_template():
    from meg.answer import AnswerConfig, answer_rows
    from meg.editor import EditedModel
    from tests.tiny_bundle import tiny_bundle, tiny_edits, tiny_loaded

    model = EditedModel.load(tiny_bundle(), loaded=tiny_loaded())
    qs = [e.prompt for e in tiny_edits()[:3]] + ["Who wrote Hamlet? It was"]
    _, explained = answer_rows(model, qs, [True] * len(qs), AnswerConfig(chat=True))
    _, mask, nearest, _ = model.route(qs)
    assert [e["question"] for e in explained] == qs
    assert [e["routed"] for e in explained] == mask.tolist()
    assert model.release_texts(qs) == [tiny_edits()[int(j)].target_new if m else None
                                       for j, m in zip(nearest.tolist(), mask.tolist())]
    # a chat given as messages is routed on its last user turn
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": qs[0]}]
    _, (e,) = answer_rows(model, [msgs], [True], AnswerConfig(chat=True))
    assert e["question"] == qs[0] and e["routed"] == bool(mask[0])
