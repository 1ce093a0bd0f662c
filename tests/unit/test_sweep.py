"""meg.sweep on a tiny model: the per-layer rows, and the subject spill a template bank adds."""

from dataclasses import replace

import torch

from meg import fit, sweep
from tests.conftest import make_edit


def _edits():
    rows = [("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
            ("The official language of Brazil is", "Swedish", "Brazil"),
            ("Toko Yasuda plays the", "piano", "Toko Yasuda")]
    return [replace(make_edit(i, p, t, para=f"In other words, {p}", loc=f"Nothing to do with it: {p}"), subject=s)
            for i, (p, t, s) in enumerate(rows)]


def test_sweep_rows_and_subject_spill(tiny_models):
    from meg.augment import TemplateBank
    from meg.editor import pseudo_pool

    loaded = tiny_models["llama"]
    bank = TemplateBank.from_records(pseudo_pool([]))
    cfg = fit.FitConfig(optimizer="adam", lr=0.3, max_steps=40, chunk_size=4, suffix="", n_variants=1)
    rows = sweep.sweep_layers(loaded, _edits(), [1, 2], cfg, progress=False, bank=bank)
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("reliability", "transfer", "spill", "subject_spill"):
            assert 0.0 <= r[k] <= 100.0, (k, r)
        assert r["seconds_per_edit"] > 0
    assert "subject_spill" not in sweep.sweep_layers(loaded, _edits()[:1], [2], replace(cfg, n_variants=0),
                                                      progress=False)[0]


def test_first_token_change_is_zero_for_zero_weights_and_counts_changes(tiny_models):
    loaded = tiny_models["llama"]
    prompts = ["The capital of France is", "Apple was founded by"]
    res = fit.fit_edits(loaded, [make_edit(0, prompts[0], "Rome"), make_edit(1, prompts[1], "Bill Gates")],
                        fit.FitConfig(layer=2, optimizer="adam", lr=0.3, max_steps=60, chunk_size=4, suffix=""),
                        progress=False)
    zeros = torch.zeros_like(res.weights)
    assert sweep.first_token_change(loaded, prompts, zeros, 2, "identity") == 0.0
    assert res.success.any(), res.report()
    # a fitted neuron puts its (random-model-unlikely) target first on its own prompt
    assert sweep.first_token_change(loaded, prompts, res.weights, 2, "identity") > 0.0
