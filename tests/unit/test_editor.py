"""The MeG editor end to end on a tiny random model: build, answer, save/load, refusals."""

import json

import pytest
import torch

from meg import editor, evaluate, lm
from meg.errors import BundleError, ConfigError
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
        weights="generator",
        rewrite={"source": "frames"},  # no model call: a random model writes no rewording worth keeping
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


def test_edit_prompts_get_their_fitted_weights(built, tmp_path):
    """exact_prompts (the default): an edit's own prompt, in any case and spacing, is answered with the fitted
    weights; any other wording with generated ones; off, every routed prompt gets generated weights."""
    model, edits = built
    assert model.cfg.exact_prompts and model.lookup is not None
    asked = ["  " + e.prompt.upper().replace(" ", "  ") for e in edits] + [e.paraphrases[0] for e in edits]
    model._cache.clear()
    w, mask = model._weights_for(asked)
    n = len(edits)
    assert mask[:n].all() and torch.equal(w[:n], model.lookup)
    routed = mask[n:].nonzero().flatten()
    assert routed.numel() and not any(torch.equal(w[n + i], model.lookup[i]) for i in routed.tolist())
    why = model.explain(asked)
    assert [r["exact"] for r in why] == [True] * n + [False] * n
    assert [r["reason"] for r in why[:n]] == ["exact"] * n
    assert all(r["reason"] == "routed" for r in why[n:] if r["routed"])
    assert [r["nearest"] for r in why[:n]] == list(range(n))
    records = model.routing_records(edits)
    assert all(r["rel_exact"] and r["rel_routed"] for r in records) and not any(r["gen_exact"] for r in records)

    off = editor.EditedModel(model.loaded, model.layer, model.act, model.encoder, model.router, model.generator,
                             model.w0, editor.with_overrides(model.cfg, {"exact_prompts": False}),
                             info=model.info, cond_encoder=model.cond_encoder, edit_cond=model.edit_cond)
    generated, _ = off._weights_for([e.prompt for e in edits])
    assert not torch.equal(generated, model.lookup)
    assert torch.allclose(generated, model.sample_weights([e.prompt for e in edits],
                                                          model.route([e.prompt for e in edits])[0]), atol=1e-5)

    bundle = model.save(tmp_path / "bundle")
    assert json.loads((bundle / "edit_prompts.json").read_text()) == [e.prompt for e in edits]
    again = editor.EditedModel.load(bundle, loaded=model.loaded)
    assert torch.equal(again._weights_for(asked[:n])[0], model.lookup)
    with pytest.raises(BundleError, match="exact_prompts"):
        editor.EditedModel(model.loaded, model.layer, model.act, model.encoder, model.router, model.generator,
                           model.w0, model.cfg, cond_encoder=model.cond_encoder, edit_cond=model.edit_cond)


def test_router_off_sends_every_prompt_to_its_nearest_edit(built, tmp_path):
    """The ablation "router off": no threshold, so unrelated prompts get an edit's weights too, but each prompt
    still gets its nearest edit's (with lookup, an edit prompt its own fitted weights), also after save/load."""
    model, edits = built
    cfg = editor.with_overrides(model.cfg, {"router": "off", "weights": "lookup"})
    router, calibration = editor.fit_router(cfg, model.encoder, edits, None)
    assert calibration is None
    off = editor.EditedModel(model.loaded, model.layer, model.act, model.encoder, router, None, model.w0, cfg,
                             lookup=model.lookup, info=model.info)
    prompts = [e.prompt for e in edits]
    far = ["zzzz qqqq", "1 2 3 4 5 6"]
    _, mask, nearest, _ = off.route(prompts + far)
    assert mask.all() and nearest[: len(edits)].tolist() == list(range(len(edits)))
    w, routed = off._weights_for(prompts + far)
    assert routed.all() and torch.equal(w[: len(edits)], model.lookup)
    assert all(any(torch.equal(w[i], row) for row in model.lookup) for i in range(len(edits), len(w)))
    again = editor.EditedModel.load(off.save(tmp_path / "off"), loaded=model.loaded)
    assert torch.equal(again._weights_for(prompts + far)[0], w)


def test_weights_for_gives_what_each_source_stands_for(built):
    """The query path asks the model's weight source (meg.sources) once per batch and gets the weights the
    settings stand for. Generated weights: an edit's own prompt its fitted weights, any other routed prompt the
    generator's seeded sample of its own condition; lookup: every routed prompt its nearest edit's fitted weights;
    unrouted prompts: none. The speed options change nothing with lookup."""
    from meg.answer import AnswerConfig, question_weights
    from meg.sources import DiffusionSource, LookupSource

    model, edits = built
    n = len(edits)
    asked = ([e.prompt for e in edits] + [e.paraphrases[0] for e in edits] + [e.locality[0].prompt for e in edits]
             + ["zzzz qqqq", "1 2 3 4 5 6"])
    assert isinstance(model.source, DiffusionSource) and model.source.generator is model.generator
    model._cache.clear()
    w, mask = model._weights_for(asked)
    emb, r, exact = model.route_exact_detail(asked)
    assert torch.equal(mask, r.mask) and sorted(exact) == list(range(n))
    fitted = sorted(exact)
    generated = [i for i in mask.nonzero().flatten().tolist() if i not in exact]
    assert generated and (~mask).any()
    assert torch.equal(w[fitted], model.lookup[r.nearest[fitted]])
    texts = [asked[i] for i in generated]
    cond = editor.join_conditions(emb[generated], editor.condition_encoder(model.cfg), texts)
    assert torch.allclose(w[generated], model.generator.sample(cond, seed=model.cfg.sample_seed), atol=1e-6)
    assert not w[~mask].any()

    cfg = editor.with_overrides(model.cfg, {"weights": "lookup"})
    looked = editor.EditedModel(model.loaded, model.layer, model.act, model.encoder, model.router, model.generator,
                                model.w0, cfg, lookup=model.lookup, info=model.info)
    assert isinstance(looked.source, LookupSource) and looked.generator is None  # the generator is not its part
    wl, ml = looked._weights_for(asked)
    _, rl = looked.route_detail(asked)  # no exact routing: every routed prompt is looked up anyway
    rows = ml.nonzero().flatten()
    assert torch.equal(ml, rl.mask) and rows.numel() > n
    assert torch.equal(wl[rows], model.lookup[rl.nearest[rows]]) and not wl[~ml].any()
    for options in (AnswerConfig(sample_steps=2), AnswerConfig(weight_cache="edit")):
        fast, fast_mask = question_weights(looked, asked, options)
        assert torch.equal(fast, wl) and torch.equal(fast_mask, ml)


def test_bundles_keep_their_files_and_older_bundles_still_load(built, tmp_path):
    """Each source writes the files bundle format 1 always had; a bundle from before the weights and exact_prompts
    settings (no such keys, no edit prompts, no fitted weights) loads as generated weights for every routed prompt."""
    from safetensors.torch import load_file, save_file

    model, edits = built
    bundle = model.save(tmp_path / "generated")
    assert {p.relative_to(bundle).parts[0] for p in bundle.rglob("*") if p.is_file()} == {
        "cond_encoder", "edit_prompts.json", "edit_targets.json", "encoder", "generator", "manifest.json", "router",
        "weights.safetensors"}
    assert set(load_file(str(bundle / "weights.safetensors"))) == {"w0", "lookup", "edit_cond"}
    cfg = editor.with_overrides(model.cfg, {"weights": "lookup"})
    looked = editor.EditedModel(model.loaded, model.layer, model.act, model.encoder, model.router, model.generator,
                                model.w0, cfg, lookup=model.lookup, info=model.info)
    lookup_bundle = looked.save(tmp_path / "lookup")
    assert {p.relative_to(lookup_bundle).parts[0] for p in lookup_bundle.rglob("*") if p.is_file()} == {
        "encoder", "manifest.json", "router", "weights.safetensors"}
    assert set(load_file(str(lookup_bundle / "weights.safetensors"))) == {"w0", "lookup"}
    prompts = [e.prompt for e in edits]
    assert torch.equal(editor.EditedModel.load(lookup_bundle, loaded=model.loaded)._weights_for(prompts)[0],
                       model.lookup)

    tensors = load_file(str(bundle / "weights.safetensors"))
    del tensors["lookup"]
    save_file(tensors, str(bundle / "weights.safetensors"))
    (bundle / "edit_prompts.json").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["config"]["weights"], manifest["config"]["exact_prompts"]
    manifest["files"] = editor._hash_tree(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    old = editor.EditedModel.load(bundle, loaded=model.loaded)
    assert old.cfg.weights == "generator" and not old.cfg.exact_prompts and old.lookup is None
    w, mask = old._weights_for(prompts)
    assert mask.all() and not any(r["exact"] for r in old.explain(prompts))
    assert torch.allclose(w, model.sample_weights(prompts, model.route(prompts)[0]), atol=1e-5)


def test_generator_conditions_join_the_base_encoder(built, tmp_path):
    """generator_condition "tuned+base" (the default): the tuned and the base embedding side by side, kept in the bundle."""
    model, edits = built
    prompts = [e.prompt for e in edits]
    emb, _, _, _ = model.route(prompts)
    cond = model.conditions(prompts, emb)
    base = model.cond_encoder.encode(prompts)
    assert cond.shape == (len(edits), emb.shape[1] + base.shape[1])
    assert torch.allclose(cond.norm(dim=1), torch.ones(len(edits)), atol=1e-5)
    half = torch.nn.functional.normalize(emb, dim=1) / 2**0.5
    assert torch.allclose(cond[:, : emb.shape[1]], half, atol=1e-5)
    assert torch.allclose(model.edit_conditions(), cond, atol=1e-4)
    bundle = model.save(tmp_path / "bundle")
    assert (bundle / "cond_encoder").is_dir()
    tuned = editor.with_overrides(model.cfg, {"generator_condition": "tuned"})
    assert editor.condition_encoder(tuned) is None
    plain, rows = editor.generator_pairs(tuned, edits, model.encoder, None)
    assert rows == list(range(len(edits))) and torch.equal(plain, model.encoder.encode(prompts))
    with pytest.raises(ConfigError, match="generator_condition"):
        editor.with_overrides(model.cfg, {"generator_condition": "base"})


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
    kept = {p.content_key for p in pool}
    removed = [p for p in editor.pseudo_pool([]) if p.content_key not in kept]
    seen = {t for e in edits for t in (e.prompt, *e.paraphrases)}
    assert removed and all(p.content_key in keys or {p.prompt, p.paraphrases[0], *(q.prompt for q in p.locality)}
                           & seen for p in removed)  # only what collides with the edits leaves the pool


def test_pseudo_pool_excludes_every_benchmark_edit_so_adding_them_changes_nothing():
    """The encoder's pairs and the calibration set stay put when benchmark facts join the edit set."""
    from meg.facts import BENCHMARKS, load_benchmark

    cf = load_benchmark("counterfact", "edit")
    pool = editor.pseudo_pool(cf[:100])
    assert [p.content_key for p in editor.pseudo_pool(cf[:1100])] == [p.content_key for p in pool]
    assert [p.content_key for p in editor.pseudo_pool(load_benchmark("zsre", "edit"))] == [
        p.content_key for p in pool]
    bench = [e for name, split in BENCHMARKS if split != "train" for e in load_benchmark(name, split)]
    bench_texts = {t for e in bench for t in (e.prompt, *e.paraphrases)}
    assert not any({p.prompt, p.paraphrases[0], *(q.prompt for q in p.locality)} & bench_texts for p in pool)
    # nor any benchmark probe, locality prompts included: a record whose locality prompt is one keeps none
    probes = {t for e in bench for t in (*e.paraphrases, *(q.prompt for q in e.locality))}
    assert not any({p.prompt, p.paraphrases[0], *(q.prompt for q in p.locality)} & probes for p in pool)
    assert sum(not p.locality for p in pool) > 1000


def _same_subject_edits():
    from dataclasses import replace

    rows = [("What company made USS Alpha?", "Acme"), ("Which corporation created USS Alpha?", "Acme"),
            ("Which corporation created USS Beta?", "Bolt"), ("What company made USS Beta?", "Crane"),
            ("What is the date of birth of Ann Roe?", "1950"), ("What city is Ann Roe from?", "Oslo"),
            ("What company made USS Gamma?", "Delta")]
    return [replace(make_edit(i, p, t), subject=p.split(" made ")[-1].split(" created ")[-1].split(" of ")[-1]
                    .replace(" from?", "").replace("What city is ", "").rstrip("?"))
            for i, (p, t) in enumerate(rows)]


def test_edit_set_templates_link_same_subject_questions_of_one_relation():
    """Real base encoder: "What company made {}?" ~ "Which corporation created {}?", not date of birth ~ city."""
    from meg.augment import TemplateBank

    edits = _same_subject_edits()
    assert [e.subject for e in edits] == ["USS Alpha"] * 2 + ["USS Beta"] * 2 + ["Ann Roe"] * 2 + ["USS Gamma"]
    bank = TemplateBank()
    encoder = editor.base_encoder(editor.MegConfig())
    assert bank.link_same_subject(edits, encoder.encode, 0.5) == 1
    assert bank.neighbours("What company made {}?") == ["Which corporation created {}?"]
    assert "What is the date of birth of {}?" not in bank
    # a subject no other edit names learns the rewording from the others
    gamma = edits[6]
    assert bank.variants(gamma.prompt, gamma.subject, 4, gamma.target_new) == ["Which corporation created USS Gamma?"]
    # a rewording that is another edit's prompt is offered only when that edit has the same target
    alpha, beta = edits[0], edits[3]
    assert bank.variants(alpha.prompt, alpha.subject, 4, alpha.target_new) == ["Which corporation created USS Alpha?"]
    assert bank.variants(beta.prompt, beta.subject, 4, beta.target_new) == []
    # off below the threshold
    assert TemplateBank().link_same_subject(edits, encoder.encode, 0.99) == 0


def test_generator_pairs_give_each_condition_one_edit(built):
    """A rewording that is another edit's prompt, or that edits with different targets share, is no condition."""
    from meg.augment import TemplateBank

    model, _ = built
    edits = _same_subject_edits()[:4]  # USS Alpha: one target twice; USS Beta: two targets
    bank = TemplateBank()
    for a, b in (("What company made {}?", "Which corporation created {}?"), ("What company made {}?", "Who built {}?"),
                 ("Which corporation created {}?", "Who built {}?")):
        bank.link(a, b)
    cfg = editor.with_overrides(model.cfg, {"generator_variants": True, "generator_condition": "tuned"})
    cond, rows = editor.generator_pairs(cfg, edits, model.encoder, bank)
    # Alpha's edits reword each other (taken as prompts); "Who built USS Alpha?" goes to the first of them;
    # "Who built USS Beta?" would map to Bolt and to Crane, so it is left out
    assert rows == [0, 1, 2, 3, 0]
    assert torch.allclose(cond[4], model.encoder.encode(["Who built USS Alpha?"])[0], atol=1e-5)


def test_template_bank_learns_from_the_edit_set_only_when_asked():
    edits = _same_subject_edits()
    on = editor.template_bank(editor.MegConfig(), [], edits)
    off = editor.template_bank(editor.with_overrides(editor.MegConfig(), {"fit.edit_templates": 0.0}), [], edits)
    assert "What company made {}?" in on and "What company made {}?" not in off


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
