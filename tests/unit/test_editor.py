"""The MeG editor end to end on a tiny random model: build, answer, save/load, refusals."""

import json

import pytest
import torch

from meg import editor, evaluate, lm
from meg.errors import BundleError
from tests.conftest import make_edit

EDITS = [
    ("The capital of France is", "Rome", "France's capital city is", "The capital of Spain is"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux speaks natively",
     "Michel Rocard is a native speaker of"),
    ("Toko Yasuda plays the", "piano", "Toko Yasuda is a player of the", "John Lennon plays the"),
    ("The Eiffel Tower is located in", "Berlin", "Where is the Eiffel Tower? It is in", "Big Ben is located in"),
]


def small_config(**overrides) -> editor.MegConfig:
    """Every part at toy size: a few encoder steps, a small generator, few pseudo-edits."""
    cfg = dict(
        fit=dict(layer=2, optimizer="adam", lr=0.3, max_steps=100, suffix="", n_variants=0),
        encoder=dict(max_steps=2, batch_size=4),
        generator=dict(denoiser="mlp", width=64, depth=2, max_steps=300, eval_every=50, target_error=0.02,
                       batch_size=16, sample_steps=10, eval_steps=5),
        n_pseudo_encoder=16,
        n_pseudo_calibration=24,
        generator_variants=False,
    )
    cfg.update(overrides)
    return editor.MegConfig(**cfg)


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("meg-home")
    old = os.environ.get("MEG_HOME")
    os.environ["MEG_HOME"] = str(home)  # the encoder cache goes here, not into the user's cache
    try:
        edits = [make_edit(i, p, t, para, loc) for i, (p, t, para, loc) in enumerate(EDITS)]
        model = editor.build(tiny_models["llama"], edits, small_config(), progress=False)
        yield model, edits
    finally:
        model.close() if "model" in locals() else None
        if old is None:
            os.environ.pop("MEG_HOME", None)
        else:
            os.environ["MEG_HOME"] = old


def test_edit_prompts_are_routed_and_answered(built):
    model, edits = built
    _, mask, nearest, conf = model.route([e.prompt for e in edits])
    assert mask.all() and nearest.tolist() == list(range(len(edits)))
    assert ((conf >= 0) & (conf <= 1)).all()
    assert model.info["fit"]["n_edits"] == len(edits)
    acc, _ = model.score([e.prompt for e in edits], [e.target_new for e in edits])
    assert sum(acc) / len(acc) >= 0.75


def test_unrouted_prompts_leave_the_base_model_unchanged(built, tiny_models):
    model, _ = built
    far = ["zzzz qqqq", "1 2 3 4 5 6"]
    _, mask, _, _ = model.route(far)
    base = evaluate.EditedLM(tiny_models["llama"])
    for prompt, routed in zip(far, mask.tolist()):
        if not routed:
            assert model.generate([prompt], 5) == base.generate([prompt], 5)


def test_cached_weights_equal_fresh_samples(built):
    model, edits = built
    prompts = [e.prompt for e in edits]
    first, mask1 = model._weights_for(prompts)
    model._cache.clear()
    fresh, mask2 = model._weights_for(list(reversed(prompts)))
    assert torch.equal(mask1, mask2.flip(0))
    assert torch.allclose(first, fresh.flip(0), atol=1e-5)


def test_save_load_round_trip_gives_the_same_answers(built, tiny_models, tmp_path):
    model, edits = built
    prompts = [e.prompt for e in edits] + [e.paraphrases[0] for e in edits]
    before = model.generate(prompts, 4)
    model.save(tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["base_model_hash"] == tiny_models["llama"].content_hash
    assert {"meg", "torch", "transformers"} <= set(manifest["versions"])
    loaded = editor.EditedModel.load(tmp_path / "bundle", loaded=tiny_models["llama"])
    assert loaded.generate(prompts, 4) == before


def test_load_refuses_another_base_model(built, tiny_models, tmp_path):
    model, _ = built
    model.save(tmp_path / "bundle")
    with pytest.raises(BundleError, match="hash"):
        editor.EditedModel.load(tmp_path / "bundle", loaded=tiny_models["qwen2"])


def test_load_refuses_a_changed_file(built, tiny_models, tmp_path):
    model, _ = built
    bundle = model.save(tmp_path / "bundle")
    target = bundle / "weights.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors"):
        editor.EditedModel.load(bundle, loaded=tiny_models["llama"])


def test_pseudo_pool_shares_no_text_with_the_edits():
    from meg.facts import load_benchmark

    edits = load_benchmark("counterfact", "train")[:50]  # edits that are also train records
    pool = editor.pseudo_pool(edits)
    texts = {e.prompt for e in edits}
    keys = {e.content_key for e in edits}
    assert pool and all(p.content_key not in keys and p.prompt not in texts for p in pool)


def test_generator_checkpoints_are_kept_apart_per_edit_set_and_settings(tmp_path):
    """Builds sharing a work dir resume each other only when they would train the same generator."""
    edits = [make_edit(i, p, t) for i, (p, t, _, _) in enumerate(EDITS)]
    cfg = small_config()
    base = editor._generator_ckpt_dir(cfg, edits, tmp_path)
    assert base.parent == tmp_path / "generator"
    gated = editor.with_overrides(cfg, {"router_options.subject_gate": True})
    assert editor._generator_ckpt_dir(gated, edits, tmp_path) == base
    assert editor._generator_ckpt_dir(cfg, edits[:2], tmp_path) != base
    for change in ({"generator.width": 32}, {"encoder.max_steps": 3}, {"fit.lr": 0.2}):
        assert editor._generator_ckpt_dir(editor.with_overrides(cfg, change), edits, tmp_path) != base, change
    assert editor._generator_ckpt_dir(cfg, edits, None) is None
