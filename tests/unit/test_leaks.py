"""The closed protocol end to end (tiny model): every run's leak counters are 0, and they catch a leak."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meg.facts import EditRequest, Probe, load_benchmark

ZERO = {"paraphrase_templates_fitted": 0, "paraphrases_trained": 0, "locality_prompts_trained": 0}


def _config():
    from tests.unit.test_editor import small_config

    return small_config(weights="lookup", fit=dict(layer=2, optimizer="adam", lr=0.3, max_steps=20, suffix="",
                                                   n_variants=2, context_fallback=0, chat_contexts=1))


@pytest.fixture
def home(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))  # after the tokenizer is loaded from the real cache
    return tmp_path


def _run(loaded, edits, methods, cfg, n_evaluated=None, protocol="ag"):
    from meg.benchmark import run_methods
    from meg.editor import MegEditor
    from meg.editors import make_editor

    def factory(name):
        return MegEditor(cfg, progress=False) if name == "meg" else make_editor(name)

    return run_methods(loaded, edits, "test", methods, batch_size=8, editor_factory=factory, n_evaluated=n_evaluated,
                       protocol=protocol)


def test_a_counterfact_run_is_clean_for_every_method(home, tiny_models):
    edits = load_benchmark("counterfact", "edit")[:6]
    res = _run(tiny_models["llama"], edits, ["none", "meg"], _config(), n_evaluated=4)
    for name in ("none", "meg"):
        leaks = res.extras[name]["leaks"]
        assert {k: leaks[k] for k in ZERO} == ZERO, name
        assert leaks["n_evaluated"] == 4
    assert res.methods["meg"]["cf_score"] is not None  # the field's score sits beside ours
    assert res.extras["meg"]["label"] == "MeG, lookup weights"  # the method as run, named in tables
    assert "meg (MeG, lookup weights)" in res.table() and "none (unedited model)" in res.table()


def test_a_chat_protocol_run_asks_the_edited_model_in_chat_turns(home, tiny_models):
    """The in-memory MeG model answers the chat protocol (user turns, the neuron released after the target)."""
    edits = load_benchmark("counterfact", "edit")[:4]
    res = _run(tiny_models["llama"], edits, ["meg"], _config(), protocol="chat")
    assert res.protocol == "chat" and res.summary()["protocol"] == "chat"
    m = res.methods["meg"]
    assert {"rel_ag", "gen_ag", "loc_ag", "score"} <= set(m) and m["es"] is None
    assert {k: res.extras["meg"]["leaks"][k] for k in ZERO} == ZERO


def _facts():
    """Facts with two paraphrases each: the first is asked; the second may be fitted unless it has the first's
    template (the first fact's does: "{} is a native speaker of")."""
    rows = [("The mother tongue of Ann Roe is", "Ann Roe", "English", "Ann Roe is a native speaker of",
             "As far as we know. Ann Roe is a native speaker of", "The mother tongue of Bob Lee is"),
            ("The capital of Zedland is", "Zedland", "Oslo", "Zedland has its seat of government in",
             "Which city is the capital of Zedland?", "The capital of Yorland is")]
    return [EditRequest(id=f"f-{i}", prompt=p, subject=s, target_new=t, paraphrases=(a, b), locality=(Probe(q),))
            for i, (p, s, t, a, b, q) in enumerate(rows)]


def test_a_facts_file_may_fit_its_own_further_paraphrases_but_not_the_asked_ones(home, tiny_models):
    from meg.editor import MegEditor

    edits = _facts()
    editor = MegEditor(_config(), progress=False)
    from meg.probes import Blocklist

    editor.probes = Blocklist.of_probes(edits)
    model = editor.apply(tiny_models["llama"], edits)
    fitted = model.exposure.fitted
    assert "Which city is the capital of Zedland?" in fitted[edits[1].content_key]  # a further paraphrase: fitted
    assert "As far as we know. Ann Roe is a native speaker of" not in fitted[edits[0].content_key]  # asked template
    leaks = model.exposure.leaks(edits)
    assert {k: leaks[k] for k in ZERO} == ZERO


def test_the_counters_catch_a_build_that_sees_its_probes(home, tiny_models, monkeypatch):
    """Without the blocklist the further paraphrase sharing the asked one's template is fitted: counted."""
    from meg import editor as editor_mod
    from meg.editor import MegEditor
    from meg.probes import Blocklist

    monkeypatch.setattr(editor_mod, "build_blocklist", lambda edits, probes=None: Blocklist())
    edits = [replace(e, locality=e.locality) for e in _facts()]
    model = MegEditor(_config(), progress=False).apply(tiny_models["llama"], edits)
    assert model.exposure.leaks(edits)["paraphrase_templates_fitted"] >= 1
