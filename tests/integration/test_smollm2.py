"""End-to-end checks on the real SmolLM2-135M (dequantised from its PyPI package once per machine)."""

import pytest
import torch

from meg import evaluate, fit, lm
from meg.facts import load_benchmark

pytestmark = pytest.mark.integration


def test_model_source_hash_and_facts(smollm2):
    assert smollm2.model_id == "smollm2-135m"
    assert len(smollm2.content_hash) == 64 and smollm2.content_hash == lm.content_hash(lm.Path(smollm2.path))
    assert lm.num_layers(smollm2.model) == 30 and lm.hidden_size(smollm2.model) == 576
    assert lm.ffn_activation_name(smollm2.model) == "silu"
    out = evaluate.EditedLM(smollm2).generate(["The capital of France is"], 3)[0]
    assert out.strip().startswith("Paris")


def test_fitting_reaches_every_target_and_greedy_decoding_agrees(smollm2):
    edits = load_benchmark("counterfact", "edit")[:8]
    res = fit.fit_edits(smollm2, edits, fit.FitConfig(), progress=False)
    assert bool(res.success.all()), res.report()
    rows = {e.prompt: i for i, e in enumerate(edits)}

    def weights_fn(prompts):
        return res.weights[[rows[p] for p in prompts]], torch.ones(len(prompts), dtype=torch.bool)

    edited = evaluate.EditedLM(smollm2, weights_fn, layer=res.layer)
    outs = edited.generate([e.prompt for e in edits], 8)
    for out, e in zip(outs, edits):
        assert evaluate.normalise_answer(out) == evaluate.normalise_answer(e.target_new), (out, e.target_new)


def test_unedited_model_scores_low_reliability_and_full_locality(smollm2):
    edits = load_benchmark("counterfact", "edit")[:16]
    base = evaluate.EditedLM(smollm2)
    labels = evaluate.locality_labels(base, edits)
    m = evaluate.evaluate(base, edits, labels).metrics
    assert m["loc_ag"] == 100.0 and m["loc_tf"] == 100.0
    assert m["rel_ag"] <= 20.0


def test_early_stopped_generation_gives_the_same_metrics_as_full_generation(smollm2):
    edits = load_benchmark("counterfact", "edit")[100:116]
    base = evaluate.EditedLM(smollm2)
    prompts = [e.prompt for e in edits] + [e.paraphrases[0] for e in edits]
    wants = [evaluate.normalise_answer(" " + e.target_old) for e in edits] * 2  # some of these match
    full = base.generate(prompts)
    short = base.generate(prompts, expected=wants)
    assert [evaluate.normalise_answer(f) == w for f, w in zip(full, wants)] == \
        [evaluate.normalise_answer(s) == w for s, w in zip(short, wants)]
    assert sum(len(s) for s in short) < sum(len(f) for f in full)


def test_meg_end_to_end_on_a_small_counterfact_slice(smollm2, tmp_path, monkeypatch):
    """A small MeG build (short encoder tuning, small generator) edits, generalises and stays local."""
    from meg import benchmark, editor

    monkeypatch.setenv("MEG_HOME", str(tmp_path / "home"))
    edits = load_benchmark("counterfact", "edit")[:24]
    cfg = editor.MegConfig(
        encoder=dict(max_steps=20),
        generator=dict(max_steps=400, eval_every=100),
        weights="generator",  # MeG's own path end to end; lookup is the cheaper default
        n_pseudo_encoder=1280,
        n_pseudo_calibration=500,
    )
    res = benchmark.run_methods(smollm2, edits, "counterfact", ["meg"],
                                editor_factory=lambda name: editor.MegEditor(cfg, progress=False))
    m = res.methods["meg"]
    assert m["rel_ag"] >= 80 and m["loc_ag"] >= 80 and m["gen_ag"] >= 40, m
    confusion = res.extras["meg"]["router_confusion"]
    assert confusion["router_prompt_routed"] >= 90
    leaks = res.extras["meg"]["leaks"]  # nothing evaluated was fitted, trained or calibrated on
    assert leaks["paraphrase_templates_fitted"] == leaks["paraphrases_trained"] == 0, leaks
    assert leaks["locality_prompts_trained"] == 0, leaks
    assert res.extras["meg"]["n_rewordings"] > 0  # the model wrote rewordings, none of them a probe
