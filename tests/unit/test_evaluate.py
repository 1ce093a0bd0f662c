import pytest
import torch

from meg import evaluate
from meg.baselines.ft import FineTune, FTConfig
from tests.conftest import make_edit


def test_normalise_answer():
    assert evaluate.normalise_answer(" English.\nMore text") == "english"
    assert evaluate.normalise_answer(" Paris...") == "paris"
    assert evaluate.normalise_answer(" paris and more") != "paris"


def test_harmonic_mean():
    assert evaluate.harmonic_mean([50.0, 50.0]) == pytest.approx(50.0)
    assert evaluate.harmonic_mean([100.0, 0.0]) == 0.0
    assert evaluate.harmonic_mean([100.0, 50.0]) == pytest.approx(66.666, rel=1e-3)


def _edits():
    return [
        make_edit(0, "The capital of France is", "Rome", "France's capital city is", "The capital of Spain is", "Paris"),
        make_edit(1, "Toko Yasuda plays the", "piano", "Toko Yasuda is good at the", "John Lennon plays the", "guitar"),
        make_edit(2, "The Eiffel Tower is in", "Berlin", "Where is the Eiffel Tower? In", "Big Ben is in", "Paris"),
    ]


def test_unedited_model_keeps_locality_and_is_deterministic(tiny_models):
    loaded = tiny_models["llama"]
    base = evaluate.EditedLM(loaded, batch_size=2)
    edits = _edits()
    labels = evaluate.locality_labels(base, edits)
    r1 = evaluate.evaluate(base, edits, labels)
    r2 = evaluate.evaluate(base, edits, labels)
    assert r1.metrics == r2.metrics
    assert r1.metrics["loc_ag"] == 100.0 and r1.metrics["loc_tf"] == 100.0
    assert all(0 <= r1.metrics[k] <= 100 for k in evaluate.METRICS)
    assert r1.metrics["es"] is not None


def test_batching_does_not_change_answers(tiny_models):
    loaded = tiny_models["gpt2"]
    prompts = ["The capital of France is", "A", "Toko Yasuda plays the guitar and the"]
    single = evaluate.EditedLM(loaded, batch_size=1).generate(prompts, 5)
    batched = evaluate.EditedLM(loaded, batch_size=3).generate(prompts, 5)
    assert single == batched


def test_teacher_forced_scores_match_manual(tiny_models, tokenizer):
    loaded = tiny_models["llama"]
    acc, lp = evaluate.EditedLM(loaded).score(["The capital of France is"], ["Rome"])
    ids = tokenizer("The capital of France is Rome", return_tensors="pt").input_ids
    target = tokenizer(" Rome", add_special_tokens=False).input_ids
    logits = loaded.model(ids).logits[0, -len(target) - 1 : -1]
    manual = torch.log_softmax(logits, -1)[torch.arange(len(target)), target].mean()
    assert lp[0] == pytest.approx(float(manual), abs=1e-4)


def test_fine_tuning_edits_and_restores(tiny_models):
    loaded = tiny_models["llama"]
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    edits = _edits()
    edited = FineTune(FTConfig(layer=2, lr=1e-2, epochs=30, batch_size=3, cache=False)).apply(loaded, edits)
    acc, _ = edited.score([e.prompt for e in edits], [e.target_new for e in edits])
    assert sum(acc) / len(acc) > 0.5
    edited.close()
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_answer_decided():
    decided = evaluate.answer_decided
    assert decided(" Paris\nmore", "rome")  # a newline ends the first line
    assert not decided(" Ro", "rome") and not decided(" ROME", "rome")  # still a prefix / a match
    assert not decided(" Rome. ", "rome")  # only dots and spaces after the answer: a newline may follow
    assert decided(" Rome is", "rome") and decided(" Paris", "rome")
    assert not decided(" anything at all", None)  # without an expected answer only the newline decides
    assert not decided(" Ro\ufffd", "rome")  # an incomplete character keeps the row going


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_early_stop_keeps_ag_outcomes(tiny_models, family):
    """Stopping decided rows early gives the same AG outcome as full-length greedy decoding."""
    loaded = tiny_models[family]
    lm_ = evaluate.EditedLM(loaded, batch_size=4)
    prompts = ["The capital of France is", "A", "Toko Yasuda plays the", "Where is the Eiffel Tower? In", "B C"]
    full = lm_.generate(prompts, 12)
    # expected answers: the model's own first lines (matches), their prefixes and unrelated words (mismatches)
    wants = [evaluate.normalise_answer(full[0]), "zzz", evaluate.normalise_answer(full[2])[:3] or "q", None,
             evaluate.normalise_answer(full[4])]
    short = lm_.generate(prompts, 12, expected=wants)
    for f, s, w in zip(full, short, wants):
        assert f.startswith(s)
        if w is not None:
            assert (evaluate.normalise_answer(f) == w) == (evaluate.normalise_answer(s) == w)
