"""MEMIT, AlphaEdit and GRACE on tiny random models of every supported family."""

import pytest
import torch

from meg import lm
from meg.baselines import covariance, locate, memit, targets
from meg.baselines.alphaedit import AlphaEdit, AlphaEditConfig, null_space_projector
from meg.baselines.corpus import CorpusConfig, corpus_rows
from meg.baselines.grace import Grace, GraceConfig, build_codebook
from meg.baselines.memit import MEMIT, MEMITConfig
from meg.baselines.targets import TargetConfig
from meg.editors import make_editor
from meg.errors import ConfigError
from meg.facts import EditRequest

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")

# On a random 4-layer model a vector added at the subject cannot travel to a later position through
# random attention, so these prompts end with their subject: the lookup token predicts the target.
# The last edit has no subject (user facts may not): it falls back to the prompt's last token.
FACTS = [
    ("The mother tongue of Danielle Darrieux", "English", "Danielle Darrieux"),
    ("The instrument played by Toko Yasuda", "piano", "Toko Yasuda"),
    ("The capital city of France", "Rome", "France"),
    ("Apple was founded by", "Bill", None),
]

CORPUS = CorpusConfig(n_sampled=4, sample_tokens=8, n_train_records=20, batch_size=4)
TARGET = TargetConfig(steps=30, lr=0.5, n_prefixes=2, prefix_tokens=4, clamp_norm_factor=4.0,
                      weight_decay=0.0, suffix="", chunk_size=3)


def _edits():
    return [EditRequest(f"t-{i}", p, t, subject=s) for i, (p, t, s) in enumerate(FACTS)]


def _editor(method: str, **kw):
    if method == "memit":
        return MEMIT(MEMITConfig(**{"layers": (0, 1), "target": TARGET, "corpus": CORPUS, "mom2_weight": 1.0,
                                    "progress": False, **kw}))
    if method == "alphaedit":
        # a generous threshold: a random tiny model's keys leave no small eigenvalues otherwise
        return AlphaEdit(AlphaEditConfig(**{"layers": (0, 1), "target": TARGET, "corpus": CORPUS,
                                            "nullspace_threshold": 1e9, "l2": 1e-3, "progress": False, **kw}))
    return Grace(GraceConfig(**{"layer": 2, "suffix": "", "lr": 0.5, "progress": False, **kw}))


@pytest.fixture
def home(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("MEG_HOME", str(tmp_path))  # after the tokenizer is loaded from the real cache
    return tmp_path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in now.items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["memit", "alphaedit", "grace"])
def test_edits_reach_targets_and_close_restores(tiny_models, home, family, method):
    loaded = tiny_models[family]
    before = _state(loaded.model)
    edits = _edits()
    prompts, wanted = [e.prompt for e in edits], [e.target_new for e in edits]
    base_acc, base_lp = make_editor("none").apply(loaded, edits).score(prompts, wanted)
    edited = _editor(method).apply(loaded, edits)
    assert not _same(loaded.model, before) or method == "grace"
    acc, lp = edited.score(prompts, wanted)
    edited.close()
    assert _same(loaded.model, before)
    assert sum(base_acc) == 0
    if family == "gemma3":
        # Gemma-3 normalises the FFN output (post-feedforward RMSNorm), and its random tiny model's
        # scaled embeddings dwarf that bounded output: edits move towards the targets, not onto them.
        assert sum(lp) > sum(base_lp) + 1.0, (lp, base_lp)
        if method != "grace":
            info = edited.extra_metrics
            assert info["residual_after"][0] < 0.9 * info["residual_before"][0]
    else:
        assert sum(acc) / len(acc) >= 0.75, (acc, edited.extra_metrics)


@pytest.mark.parametrize("method", ["memit", "alphaedit", "grace"])
def test_restores_after_an_exception_while_editing(tiny_models, home, monkeypatch, method):
    loaded = tiny_models["llama"]
    before = _state(loaded.model)
    editor = _editor(method)
    if method == "grace":
        from meg.baselines import grace

        def boom(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(grace.textbatch, "per_row_all", boom)  # inside value training, codebook attached
    else:
        calls = []
        solve = type(editor)._solve

        def second_fails(self, *a):
            calls.append(1)
            if len(calls) == 2:  # the first layer is already written into the model
                raise KeyboardInterrupt
            return solve(self, *a)

        monkeypatch.setattr(type(editor), "_solve", second_fails)
    with pytest.raises(KeyboardInterrupt):
        editor.apply(loaded, _edits())
    assert _same(loaded.model, before)


def test_fine_tuning_resumes_after_an_interruption_at_its_last_epoch(tiny_models, home, monkeypatch):
    from meg.baselines import ft

    loaded = tiny_models["llama"]
    before = _state(loaded.model)
    edits = _edits()
    cfg = ft.FTConfig(layer=1, lr=1e-2, epochs=3, batch_size=2, progress=False)  # 2 steps per epoch
    ffn = lm.ffn_module(loaded.model, 1)
    monkeypatch.setenv("MEG_HOME", str(home / "whole"))
    whole = ft.FineTune(cfg).apply(loaded, edits)
    trained = [p.clone() for p in ffn.parameters()]
    whole.close()
    assert _same(loaded.model, before)

    monkeypatch.setenv("MEG_HOME", str(home / "interrupted"))
    logits_at, calls = ft.textbatch.logits_at, []

    def counted(*a, fail_at=None, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return logits_at(*a, **k)

    monkeypatch.setattr(ft.textbatch, "logits_at", lambda *a, **k: counted(*a, fail_at=4, **k))
    with pytest.raises(KeyboardInterrupt):  # in the second step of epoch 2
        ft.FineTune(cfg).apply(loaded, edits)
    assert _same(loaded.model, before)  # the base model is whole again
    calls.clear()
    monkeypatch.setattr(ft.textbatch, "logits_at", counted)
    resumed = ft.FineTune(cfg).apply(loaded, edits)
    assert len(calls) == 4  # epochs 2 and 3 only: epoch 1 came from the checkpoint
    for p, q in zip(ffn.parameters(), trained):
        assert torch.allclose(p, q, atol=1e-6)  # the same weights as the uninterrupted run
    resumed.close()
    calls.clear()
    ft.FineTune(cfg).apply(loaded, edits).close()
    assert not calls  # a finished run is not trained again


@pytest.mark.parametrize("method", ["memit", "grace"])
def test_close_restores_after_an_exception_while_answering(tiny_models, home, method):
    loaded = tiny_models["gpt2"]
    before = _state(loaded.model)
    edited = _editor(method).apply(loaded, _edits())
    with pytest.raises(RuntimeError):
        try:
            edited.generate(["The capital city of France"], max_new_tokens=2)
            raise RuntimeError("evaluation failed")
        finally:
            edited.close()
    assert _same(loaded.model, before)


def test_lookup_is_the_subjects_last_token(tokenizer):
    text = "The mother tongue of Danielle Darrieux is"
    ids = tokenizer(text).input_ids
    i = locate.lookup_index(tokenizer, text, "Danielle Darrieux")
    assert tokenizer.decode(ids[: i + 1]).endswith("Darrieux") and tokenizer.decode(ids[i + 1 :]) == " is"
    assert locate.lookup_index(tokenizer, text, None) == len(ids) - 1
    assert locate.lookup_index(tokenizer, text, "Nobody Here") == len(ids) - 1
    assert locate.lookup_index(tokenizer, text, "danielle darrieux") == i  # case-insensitive fallback
    # behind a prefix that mentions the subject too, the prompt's mention counts
    pre = "Darrieux sang."
    full = locate.with_prefix(pre, text)
    j = locate.lookup_index(tokenizer, full, "Darrieux", len(pre) + 1)
    assert tokenizer.decode(tokenizer(full).input_ids[j + 1 :]) == " is"


def test_keys_are_read_at_the_subject_or_else_the_last_token(tiny_models):
    from meg.baselines import keys

    loaded = tiny_models["llama"]
    tok = loaded.tokenizer
    with_subject = EditRequest("x", "The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux")
    without = EditRequest("y", "Apple was founded by", "Bill")
    k = keys.edit_keys(loaded, [with_subject, without], 1, [""], progress=False)
    for row, e in enumerate([with_subject, without]):
        ids = tok(e.prompt, return_tensors="pt").input_ids
        acts = locate.capture(loaded.model, ids, torch.ones_like(ids), [("key", 1)])[("key", 1)]
        at = locate.lookup_index(tok, e.prompt, e.subject)
        assert at == (ids.shape[1] - 2 if e.subject else ids.shape[1] - 1)
        assert torch.allclose(k[row], acts[0, at], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_heads_give_the_logits_of_full_rows(tiny_models, family):
    from meg import fit, textbatch
    from meg.baselines import suffix

    loaded = tiny_models[family]
    tok, model = loaded.tokenizer, loaded.model
    # rows of different lengths, split at different tokens; one split at the very first token
    # (the last row is longer than the tiny Gemma-3's sliding window of 16 tokens)
    texts = ["The capital city of France is Paris", "Toko Yasuda plays", "A much longer row of text that goes on",
             "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]
    seqs = [tok(t).input_ids for t in texts]
    splits = [3, 2, 0, 12]
    torch.manual_seed(0)
    delta = torch.randn(len(seqs), lm.hidden_size(model))
    layer = 1
    # full rows, right-padded
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    batch = textbatch.TargetBatch(ids, mask, *([torch.tensor([0])] * 5))
    h = fit.layer_inputs(model, layer + 1, batch)
    h[torch.arange(len(seqs)), torch.tensor(splits)] += delta
    with fit.replay_from(model, layer + 1, {"h": h}):
        full = model.base_model(input_ids=ids, attention_mask=mask, position_ids=textbatch.position_ids(mask),
                                use_cache=False).last_hidden_state
    heads = suffix.HeadCache(model, suffix.split_rows(seqs, splits, 0))
    tail_h = heads.block_output(layer)
    tail_h[:, 0] += delta
    for rows in (None, torch.tensor([0, 2, 3])):  # all rows, then a subset (as edits finish)
        sel = torch.arange(len(seqs)) if rows is None else rows
        tail = heads.tail_hidden(layer + 1, tail_h[sel], rows)
        for i, r in enumerate(sel.tolist()):
            n = len(seqs[r]) - splits[r]
            assert torch.allclose(tail[i, :n], full[r, splits[r] : len(seqs[r])], atol=1e-4), (family, r)


def test_z_are_stored_and_reused(tiny_models, tmp_path, monkeypatch):
    loaded = tiny_models["llama"]
    edits = _edits()
    first = targets.target_vectors(loaded, edits[:2], 1, TARGET, tmp_path, progress=False)
    calls = []
    optimise = targets._optimise
    monkeypatch.setattr(targets, "_optimise", lambda m, l, c, n, cfg: calls.append(n) or optimise(m, l, c, n, cfg))
    second = targets.target_vectors(loaded, edits, 1, TARGET, tmp_path, progress=False)
    assert calls == [2]  # only the two new edits were optimised
    for e in edits[:2]:
        assert torch.equal(first[e.content_key]["z"], second[e.content_key]["z"])
    other = TargetConfig(**{**TARGET.__dict__, "lr": 0.1})
    assert other.key(loaded.content_hash, 1, ["a"]) != TARGET.key(loaded.content_hash, 1, ["a"])
    same = TargetConfig(**{**TARGET.__dict__, "clamp_norm_factor": 4})  # an int where the registry has 4.0
    assert same.key(loaded.content_hash, 1, ["a"]) == TARGET.key(loaded.content_hash, 1, ["a"])


def test_z_optimisation_lowers_the_loss_per_edit_independently(tiny_models):
    loaded = tiny_models["llama"]
    edits = _edits()
    together = targets.target_vectors(loaded, edits, 1, TARGET, None, progress=False)
    alone = targets.target_vectors(loaded, edits[1:2], 1, TARGET, None, progress=False)
    key = edits[1].content_key
    assert torch.allclose(together[key]["z"], alone[key]["z"], atol=1e-4)
    assert all(float(r["loss"]) < 0.5 * float(r["loss0"]) for r in together.values())


def test_z_stored_ahead_in_parts_are_what_the_edit_uses(tiny_models, home, monkeypatch):
    loaded = tiny_models["llama"]
    edits = _edits()
    for part in (edits[:2], edits[2:]):  # as two shard processes would
        assert _editor("memit").store_targets(loaded, part) == len(part)

    def no_optimising(*a, **kw):
        raise AssertionError("a z was optimised again")

    optimise = targets._optimise
    monkeypatch.setattr(targets, "_optimise", no_optimising)
    ahead = _editor("memit").apply(loaded, edits)
    w_ahead = {l: lm.out_proj_weight(loaded.model, l).clone() for l in (0, 1)}
    ahead.close()
    monkeypatch.setattr(targets, "_optimise", optimise)
    monkeypatch.setenv("MEG_HOME", str(home / "fresh"))
    at_once = _editor("memit").apply(loaded, edits)
    for l, w in w_ahead.items():
        assert torch.allclose(w, lm.out_proj_weight(loaded.model, l), atol=1e-4)
    at_once.close()
    with pytest.raises(ConfigError, match="batch_size"):
        _editor("memit", batch_size=2).store_targets(loaded, edits)
    with pytest.raises(ConfigError, match="cache"):
        _editor("memit", cache=False).store_targets(loaded, edits)


def test_covariance_matches_the_corpus_and_resumes(tiny_models, home, monkeypatch):
    loaded = tiny_models["llama"]
    monkeypatch.setattr(covariance, "TOKENS_PER_BATCH", 64)  # several batches
    rows = corpus_rows(loaded, CORPUS, progress=False)
    special = set(loaded.tokenizer.all_special_ids)
    total, n = torch.zeros(128, 128, dtype=torch.float64), 0
    for r in rows:
        ids = torch.tensor([r])
        k = locate.capture(loaded.model, ids, torch.ones_like(ids), [("key", 1)])[("key", 1)][0]
        k = k[[t not in special for t in r]].double()
        total += k.T @ k
        n += k.shape[0]
    # interrupt the pass after a few batches, with a checkpoint every batch, then resume
    capture, seen = locate.capture, []

    def flaky(*a, **kw):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return capture(*a, **kw)

    monkeypatch.setattr(covariance.locate, "capture", flaky)
    with pytest.raises(KeyboardInterrupt):
        covariance.second_moments(loaded, [1], CORPUS, checkpoint_every=1, progress=False)
    monkeypatch.setattr(covariance.locate, "capture", capture)
    c0 = covariance.second_moments(loaded, [1], CORPUS, progress=False)[1]
    assert torch.allclose(c0.double(), total / n, rtol=1e-4, atol=1e-6)
    assert covariance.stats_info(loaded, 1, CORPUS)["tokens"] == n
    assert list(home.rglob("partial-*")) == []


def test_memit_update_fits_the_residuals_when_unconstrained():
    torch.manual_seed(0)
    k, res = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    state = {"c0": {0: torch.eye(12)}}
    delta = MEMIT()._solve(k, res, 0, state, MEMITConfig(mom2_weight=1e-9))
    assert torch.allclose(k @ delta.T, res, atol=1e-6)  # Delta k_i = r_i for every edit
    stiff = MEMIT()._solve(k, res, 0, state, MEMITConfig(mom2_weight=1e6))
    assert stiff.norm() < 1e-3 * delta.norm()  # a large lambda keeps the layer where it was


def test_residuals_are_mapped_through_a_post_ffn_norm(tokenizer):
    gemma = lm.tiny_model("gemma3", tokenizer).model
    norm = lm.decoder_layers(gemma)[1].post_feedforward_layernorm
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight) * 3)  # per-unit gains far from 1, some negative
    d = norm.weight.numel()
    m, wanted = torch.randn(3, d) * 0.1, torch.randn(3, d) * 5.0
    res = (norm(wanted) - norm(m)).double()  # a change the norm's output can make
    assert (res.norm(dim=1) > norm(m).norm(dim=1)).all()  # large beside the FFN's output, as in Gemma
    dm = memit.through_post_norm(gemma, 1, m, res)
    assert torch.allclose(norm((m + dm).float()) - norm(m), res.float(), atol=1e-2)  # |res| up to 18
    assert torch.allclose((m + dm).norm(dim=1), m.norm(dim=1).double())  # the FFN output keeps its size
    naive = norm((m + res).float()) - norm(m)  # Res written as is: overshoots and saturates
    assert ((naive - res.float()).norm(dim=1) > 0.1 * res.norm(dim=1).float()).all()
    far = res * 20  # beyond what the norm can output: the layer closes what it can, never less than none
    dm = memit.through_post_norm(gemma, 1, m, far)
    goal = norm(m) + far.float()
    left = (goal - norm((m + dm).float())).norm(dim=1)
    radial = norm(goal / (1 + norm.weight.detach()))  # the norm's output pointing at the goal, scaled down
    assert (left < far.norm(dim=1).float()).all()
    assert (left < (goal - radial).norm(dim=1)).all()
    with torch.no_grad():
        norm.weight[0] = -1.0  # Gemma's gain is 1 + weight: unit 0 cannot be written at this layer
    dm = memit.through_post_norm(gemma, 1, m, res)
    got, want = norm((m + dm).float()) - norm(m), (norm(wanted) - norm(m)).detach()
    assert torch.isfinite(dm).all()
    assert (torch.cosine_similarity(got + norm(m), want + norm(m), dim=1) > 0.99).all()
    plain = lm.tiny_model("llama", tokenizer).model
    assert torch.equal(memit.through_post_norm(plain, 1, m, res), res)


def test_alphaedit_update_leaves_preserved_keys_alone():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    c0 = basis @ torch.diag(torch.tensor([5.0] * 8 + [1e-4] * 4, dtype=torch.float64)) @ basis.T
    p, dims = null_space_projector(c0, 1e-2)
    assert dims == 4 and torch.allclose(p @ p, p, atol=1e-10)
    preserved = basis[:, :8]  # directions the corpus keys occupy
    k, res = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    state = {"P": {0: p}, "Kp": {0: torch.zeros(12, 12, dtype=torch.float64)}}
    delta = AlphaEdit()._solve(k, res, 0, state, AlphaEditConfig(l2=1e-6))
    assert torch.allclose(delta @ preserved, torch.zeros(4, 8, dtype=torch.float64), atol=1e-8)
    assert delta.norm() > 0.1


def test_layer_updates_are_stored_and_reapplied(tiny_models, home, monkeypatch):
    loaded = tiny_models["qwen2"]
    editor = _editor("memit")
    first = editor.apply(loaded, _edits())
    edited_weights = lm.out_proj_weight(loaded.model, 1).clone()
    first.close()

    def no_solve(*a):
        raise AssertionError("a stored layer update was recomputed")

    monkeypatch.setattr(MEMIT, "_solve", no_solve)
    again = editor.apply(loaded, _edits())
    assert torch.equal(lm.out_proj_weight(loaded.model, 1), edited_weights)
    again.close()


def test_codebook_rules():
    keys = torch.tensor([[0.0, 0.0], [0.5, 0.0], [10.0, 0.0], [10.6, 0.0], [1.8, 0.0]])
    labels = ["a", "a", "b", "c", "a"]
    book = build_codebook(keys, labels, eps_init=1.0, expand="coverage")
    # 0: new; 1: same label within eps -> absorbed by 0 (no growth); 2: far -> new;
    # 3: conflict with 2 -> both radii split at 0.3; 4: same label as 0, 1.8 <= 1 + 1 -> radius grows to 1.8
    assert book.entry_of_edit == [0, 0, 1, 2, 0]
    assert book.eps.tolist() == pytest.approx([1.8, 0.3 - 1e-5, 0.3], abs=1e-6)
    assert book.n_split == 1 and book.n_expanded == 1
    moved = build_codebook(keys, labels, eps_init=1.0, expand="moving_average")
    assert moved.keys[0].tolist() == pytest.approx([0.9, 0.0])


def test_grace_leaves_unrelated_prompts_alone(tiny_models, home):
    loaded = tiny_models["llama"]
    probe = ["Paris is a city in", "My favourite colour is"]
    base = make_editor("none").apply(loaded, []).generate(probe, max_new_tokens=3)
    edited = _editor("grace", eps_init=0.5).apply(loaded, _edits())
    try:
        assert edited.generate(probe, max_new_tokens=3) == base
    finally:
        edited.close()


def test_grace_value_shards_store_what_one_run_would_train(tiny_models, home, monkeypatch):
    from meg.baselines import grace
    from meg.fit import WeightStore

    loaded = tiny_models["llama"]
    edits = _edits()
    whole = _editor("grace", eps_init=0.5, cache=False).apply(loaded, edits)
    try:
        expected = grace._module_fn(loaded.model, 2, "ffn").values.clone()  # the attached codebook's
    finally:
        whole.close()
    n_entries = expected.shape[0]
    stored = [_editor("grace", eps_init=0.5).store_values(loaded, edits, (i, 2)) for i in range(2)]
    assert stored == [len(range(i, n_entries, 2)) for i in range(2)]  # entries 0, 2, .. and 1, 3, ..
    (store,) = {p.parent for p in (home / "baselines" / "grace").glob("*/part-*.safetensors")}
    assert sorted(WeightStore(store).load()) == sorted(f"entry-{j}" for j in range(n_entries))

    def no_training(*a, **kw):
        raise AssertionError("a stored value was trained again")

    monkeypatch.setattr(grace, "_fit_chunk", no_training)
    edited = _editor("grace", eps_init=0.5).apply(loaded, edits)  # finds every value in the store
    try:
        assert torch.allclose(grace._module_fn(loaded.model, 2, "ffn").values, expected, atol=1e-4)
    finally:
        edited.close()
    with pytest.raises(ConfigError, match="'cache'"):
        _editor("grace", cache=False).store_values(loaded, edits, (0, 2))


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="'layers'"):
        MEMITConfig(layers=(3, 2))
    with pytest.raises(ConfigError, match="'mom2_weight'"):
        MEMITConfig(mom2_weight=0)
    with pytest.raises(ConfigError, match="'lr'"):
        MEMITConfig(target={"lr": 0})
    with pytest.raises(ConfigError, match="'nullspace_threshold'"):
        AlphaEditConfig(nullspace_threshold=0)
    with pytest.raises(ConfigError, match="'module'"):
        GraceConfig(module="attention")
    with pytest.raises(ConfigError, match="'expand'"):
        GraceConfig(expand="grow")
    with pytest.raises(ConfigError, match="'n_sampled'"):
        CorpusConfig(n_sampled=-1)


def test_layers_beyond_the_model_are_refused(tiny_models, home):
    with pytest.raises(ConfigError, match="'layers'"):
        _editor("memit", layers=(2, 3)).apply(tiny_models["llama"], _edits())


def test_every_baseline_is_registered():
    for name in ("memit", "alphaedit", "grace"):
        assert make_editor(name).name == name


def test_every_registry_entry_names_a_known_model_and_builds_its_config():
    from meg.baselines import registry

    families = {spec.family for spec in lm.ARCHITECTURES.values()}
    for (method, name), overrides in registry.HPARAMS.items():
        assert name in lm.SOURCES or name in families, (method, name)
        cfg = registry.CONFIGS[method](**overrides)  # a bad value raises ConfigError
        for key in overrides:
            assert key in cfg.__dataclass_fields__, (method, name, key)
