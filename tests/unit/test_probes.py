"""What is evaluated is never fitted, trained or calibrated on (meg.probes): blocklists, exposure, leak counters."""

from __future__ import annotations

from dataclasses import replace

from meg.facts import EditRequest, Probe, load_benchmark
from meg.probes import Blocklist, Exposure, benchmark_blocklist, norm_text, prompt_only_exposure, template_of


def _edit(i, prompt, target, subject, para=None, loc=None, more=()):
    return EditRequest(id=f"p-{i}", prompt=prompt, target_new=target, subject=subject,
                       paraphrases=tuple(x for x in (para, *more) if x), locality=(Probe(loc),) if loc else ())


def test_template_is_the_sentence_holding_the_subject():
    assert template_of("Some prefix here. Ann Roe is a native speaker of", "Ann Roe") == "{} is a native speaker of"
    assert template_of("What is the mother tongue of Ann Roe?", "Ann Roe") == "What is the mother tongue of {}?"
    assert template_of("No subject here", "Ann Roe") is None and template_of("x", None) is None
    assert norm_text("  The  Mother tongue?  ") == "the mother tongue"


def test_blocklist_blocks_probe_texts_and_paraphrase_templates():
    e = _edit(0, "The mother tongue of Ann Roe is", "English", "Ann Roe",
              para="Filler sentence. Ann Roe is a native speaker of", loc="The official language of Bob Lee is")
    bl = Blocklist.of_probes([e])
    assert bl.text_blocked("filler sentence.  ann roe is a native speaker of")
    assert bl.text_blocked("The official language of Bob Lee is")
    # the paraphrase's template, with any subject, may not be a rewording; the prompt's may
    assert bl.blocks_rewording("Carl Diaz is a native speaker of", "Carl Diaz")
    assert not bl.blocks_rewording("The mother tongue of Carl Diaz is", "Carl Diaz")
    # a locality prompt blocks its text, not its template (it is a statement of another subject)
    assert not bl.blocks_rewording("The official language of Carl Diaz is", "Carl Diaz")


def test_of_blocks_every_paraphrase_of_probes_only_the_first():
    e = _edit(0, "Q of Ann Roe is", "x", "Ann Roe", para="Ann Roe para one", more=("Ann Roe para two",))
    assert Blocklist.of([e]).text_blocked("Ann Roe para two")
    assert not Blocklist.of_probes([e]).text_blocked("Ann Roe para two")


def test_benchmark_blocklist_covers_every_benchmark_probe():
    bl = benchmark_blocklist()
    cf = load_benchmark("counterfact", "edit")
    zsre = load_benchmark("zsre", "edit")
    for e in (cf[0], cf[-1], zsre[0], zsre[-1]):
        assert bl.text_blocked(e.paraphrases[0]) and bl.text_blocked(e.locality[0].prompt)
        assert bl.template_blocked(template_of(e.paraphrases[0], e.subject))


def _probe_edits():
    return [_edit(0, "The mother tongue of Ann Roe is", "English", "Ann Roe",
                  para="Ann Roe is a native speaker of", loc="The mother tongue of Bob Lee is"),
            _edit(1, "The capital of Zed is", "Oslo", "Zed", para="Zed has its seat of government in",
                  loc="The capital of Yor is")]


def test_clean_exposure_counts_no_leak():
    edits = _probe_edits()
    exp = Exposure(fitted={e.content_key: [e.prompt, f"What is the mother tongue of {e.subject}?"] for e in edits})
    exp.add_seen(["The mother tongue of Carl Diaz is"])
    exp.add_rewordings([("Which language does Carl Diaz speak?", "Carl Diaz")])
    leaks = exp.leaks(edits)
    assert leaks == {"paraphrase_templates_fitted": 0, "paraphrases_trained": 0, "locality_prompts_trained": 0,
                     "n_evaluated": 2}


def test_each_leak_is_counted():
    """The counters can fail: a paraphrase template fitted to the edit, one used as a rewording elsewhere, a
    paraphrase's text and a locality prompt's text reaching training."""
    edits = _probe_edits()
    own = Exposure(fitted={edits[0].content_key: [edits[0].prompt, "Ann Roe is a native speaker of"]})
    assert own.leaks(edits)["paraphrase_templates_fitted"] == 1
    assert own.leaks(edits)["paraphrases_trained"] == 1
    elsewhere = Exposure()
    elsewhere.add_rewordings([("Carl Diaz has its seat of government in", "Carl Diaz")])
    assert elsewhere.leaks(edits)["paraphrase_templates_fitted"] == 1
    seen = Exposure()
    seen.add_seen(["the capital of YOR is"])
    assert seen.leaks(edits)["locality_prompts_trained"] == 1
    # a locality prompt that is not asked (it is an edited fact) is not counted
    assert seen.leaks(edits, [True, False])["locality_prompts_trained"] == 0


def test_an_edit_without_subject_is_compared_by_text():
    e = replace(_probe_edits()[0], subject=None)
    exp = Exposure(fitted={e.content_key: [e.prompt, "Ann Roe is a native speaker of"]})
    assert exp.leaks([e])["paraphrase_templates_fitted"] == 1
    exp = Exposure(fitted={e.content_key: [e.prompt, "Carl Diaz is a native speaker of"]})
    assert exp.leaks([e])["paraphrase_templates_fitted"] == 0


def test_prompt_only_exposure_counts_tuning_texts():
    edits = _probe_edits()
    assert prompt_only_exposure(edits).leaks(edits)["locality_prompts_trained"] == 0
    assert prompt_only_exposure(edits, ["The capital of Yor is"]).leaks(edits)["locality_prompts_trained"] == 1
