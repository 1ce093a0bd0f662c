import pytest
import torch
import torch.nn.functional as F

from meg.errors import BundleError, ConfigError
from meg.generator import (
    DiTDenoiser,
    GeneratorConfig,
    MLPDenoiser,
    PRESETS,
    WeightGenerator,
    jitter_radius,
    relative_errors,
)

C, D = 16, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny: one thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pairs(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = F.normalize(torch.randn(n, C, generator=g), dim=1)
    w0 = torch.randn(D, generator=g) * 0.1
    w = w0 + torch.tanh(cond @ torch.randn(C, 32, generator=g) * 2) @ torch.randn(32, D, generator=g)
    return cond, w, w0


def _tiny(**overrides) -> GeneratorConfig:
    base = dict(width=32, depth=2, heads=2, batch_size=16, max_steps=20, eval_every=10, eval_size=16, eval_steps=5,
                sample_steps=5, checkpoint_every=7, warmup_steps=5, target_error=1e-6)
    return GeneratorConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def trained():
    cond, w, w0 = _pairs()
    gen = WeightGenerator(_tiny(max_steps=30))
    gen.fit(cond, w, w0, progress=False)
    return gen, cond


@pytest.mark.parametrize("denoiser, kwargs", [
    (DiTDenoiser, dict(patch_size=8, width=32, depth=2, heads=2)),
    (DiTDenoiser, dict(patch_size=8, width=32, depth=2, heads=2, token_cond=True)),
    (DiTDenoiser, dict(patch_size=0, width=32, depth=2, heads=2)),
    (DiTDenoiser, dict(patch_size=0, width=32, depth=2, heads=2, head_width=64)),
    (MLPDenoiser, dict(width=32, depth=2)),
    (MLPDenoiser, dict(width=32, depth=2, head_width=64)),
])
def test_fresh_denoiser_outputs_zeros(denoiser, kwargs):
    torch.manual_seed(0)
    model = denoiser(D, C, **kwargs)
    out = model(torch.randn(5, D), torch.randint(0, 1000, (5,)), torch.randn(5, C))
    assert out.shape == (5, D)
    assert torch.equal(out, torch.zeros(5, D))


@pytest.mark.parametrize("denoiser, kwargs", [(DiTDenoiser, dict(width=8, depth=1, heads=2)),
                                              (MLPDenoiser, dict(width=8, depth=1))])
def test_output_head_lifts_the_rank_bound_of_the_width(denoiser, kwargs):
    """A linear output spans at most `width` directions over all inputs; a GELU head spans more."""
    ranks = {}
    for head_width in (0, 64):
        torch.manual_seed(0)
        model = denoiser(D, C, head_width=head_width, **kwargs)
        for p in model.parameters():  # leave the zero initialisation: any trained state
            torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            out = model(torch.randn(64, D), torch.randint(0, 1000, (64,)), torch.randn(64, C))
        ranks[head_width] = int(torch.linalg.matrix_rank(out - out.mean(0)))
    assert ranks[0] <= 8 < ranks[64], ranks


def test_dit_pads_to_whole_patches():
    model = DiTDenoiser(D + 3, C, patch_size=8, width=32, depth=1, heads=2)
    assert model.num_tokens == 6
    assert DiTDenoiser(D, C, patch_size=0, width=32, depth=1, heads=2).num_tokens == 1
    assert model(torch.randn(2, D + 3), torch.tensor([1, 999]), torch.randn(2, C)).shape == (2, D + 3)


def test_sampling_is_deterministic_per_seed(trained):
    gen, cond = trained
    a = gen.sample(cond[:4], seed=3)
    b = gen.sample(cond[:4], seed=3)
    c = gen.sample(cond[:4], seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_sample_does_not_depend_on_the_batch(trained):
    gen, cond = trained
    alone = gen.sample(cond[2:3], seed=1)
    batched = gen.sample(cond[:6], seed=1, batch_size=4)
    assert torch.allclose(alone[0], batched[2], atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_samplers_run(trained, sampler):
    gen, cond = trained
    out = gen.sample(cond[:3], steps=4, sampler=sampler, seed=0)
    assert out.shape == (3, D) and torch.isfinite(out).all()
    assert torch.equal(out, gen.sample(cond[:3], steps=4, sampler=sampler, seed=0))


def test_guidance_runs(trained):
    gen, cond = trained
    out = gen.sample(cond[:2], guidance_scale=2.0)
    assert out.shape == (2, D) and torch.isfinite(out).all()


def test_overfits_a_few_pairs():
    cond, w, w0 = _pairs(16)
    cfg = _tiny(max_steps=400, eval_every=50, target_error=0.1, ema_decay=0.99, cond_dropout=0.0)
    gen = WeightGenerator(cfg)
    history = gen.fit(cond, w, w0, progress=False)
    errors = relative_errors(gen.sample(cond, steps=20) - w0, w - w0)
    assert history[-1]["error"] < 0.1
    assert gen.steps_trained < 400  # stopped early on the target
    assert errors.mean() < 0.15, errors


@pytest.mark.parametrize("overrides", [dict(patch_size=8, token_cond=True), dict(denoiser="mlp", width=64),
                                       dict(prediction_type="v_prediction", loss_weighting="min_snr")])
def test_variants_train(overrides):
    cond, w, w0 = _pairs(8)
    gen = WeightGenerator(_tiny(max_steps=15, **overrides))
    gen.fit(cond, w, w0, progress=False)
    assert torch.isfinite(gen.sample(cond)).all()


def test_save_load_round_trip(trained, tmp_path):
    gen, cond = trained
    gen.save(tmp_path / "gen")
    back = WeightGenerator.load(tmp_path / "gen")
    assert back.config == gen.config
    assert torch.equal(back.sample(cond, seed=2), gen.sample(cond, seed=2))
    assert back.history == gen.history


def test_generator_saved_before_the_output_head_loads_as_linear(tmp_path):
    """Files written before head_width / lr_schedule existed were linear-output, constant-lr generators."""
    import json

    from meg.generator import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
    from meg.hashing import file_sha256

    cond, w, w0 = _pairs(8)
    old = WeightGenerator(_tiny(max_steps=5, head_width=0, lr_schedule="constant"))
    old.fit(cond, w, w0, progress=False)
    out = old.save(tmp_path / "gen")
    meta = json.loads((out / CONFIG_FILE).read_text())
    for key in ("head_width", "lr_schedule", "lr_min_ratio"):
        del meta["config"][key]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    manifest = {"files": {n: file_sha256(out / n) for n in (CONFIG_FILE, WEIGHTS_FILE)}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    back = WeightGenerator.load(out)
    assert back.config.head_width == 0 and back.config.lr_schedule == "constant"
    assert torch.equal(back.sample(cond), old.sample(cond))


def test_truncated_file_is_refused(trained, tmp_path):
    gen, _ = trained
    out = gen.save(tmp_path / "gen")
    weights = out / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BundleError, match="generator.safetensors"):
        WeightGenerator.load(out)


def test_missing_manifest_is_refused(trained, tmp_path):
    gen, _ = trained
    out = gen.save(tmp_path / "gen")
    (out / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        WeightGenerator.load(out)


def test_resume_equals_uninterrupted_run(tmp_path):
    # the interruption is a shorter max_steps (under a cosine schedule that would be a warm restart)
    cond, w, w0 = _pairs(12)
    full = WeightGenerator(_tiny(max_steps=25, lr_schedule="constant"))
    full.fit(cond, w, w0, progress=False)

    first = WeightGenerator(_tiny(max_steps=11, lr_schedule="constant"))  # stops between checkpoints (every 7)
    first.fit(cond, w, w0, ckpt_dir=tmp_path / "ckpt", progress=False)
    second = WeightGenerator(_tiny(max_steps=25, lr_schedule="constant"))
    second.fit(cond, w, w0, ckpt_dir=tmp_path / "ckpt", progress=False, resume=True)

    for a, b in zip(full.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [(h["step"], h["loss"], h["error"]) for h in full.history] == \
           [(h["step"], h["loss"], h["error"]) for h in second.history]
    assert torch.equal(full.sample(cond), second.sample(cond))


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    gen = WeightGenerator(GeneratorConfig(lr=1e-2, warmup_steps=10, max_steps=110, lr_schedule="cosine",
                                          lr_min_ratio=0.1))
    lrs = [gen._lr(step) for step in range(200)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert lrs[60] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[110] == pytest.approx(1e-3) and lrs[199] == pytest.approx(1e-3)
    constant = WeightGenerator(GeneratorConfig(lr=1e-2, warmup_steps=10, lr_schedule="constant"))
    assert constant._lr(500) == 1e-2


def test_interrupted_cosine_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    cond, w, w0 = _pairs(12)
    full = WeightGenerator(_tiny(max_steps=25, lr_schedule="cosine"))
    full.fit(cond, w, w0, progress=False)

    real_step = WeightGenerator._train_step

    def crash_at_step_10(self, *args):
        if args[-1] == 10:  # the step
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(WeightGenerator, "_train_step", crash_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        WeightGenerator(_tiny(max_steps=25, lr_schedule="cosine")).fit(cond, w, w0, ckpt_dir=tmp_path,
                                                                      progress=False)
    steps_run = []

    def count(self, *args):
        steps_run.append(args[-1])  # the step
        return real_step(self, *args)

    monkeypatch.setattr(WeightGenerator, "_train_step", count)
    resumed = WeightGenerator(_tiny(max_steps=25, lr_schedule="cosine"))
    resumed.fit(cond, w, w0, ckpt_dir=tmp_path, progress=False)
    assert steps_run[0] == 7 and len(steps_run) == 18  # continued from the step-7 checkpoint
    assert torch.equal(full.sample(cond), resumed.sample(cond))


def test_corrupted_checkpoint_is_refused(tmp_path):
    cond, w, w0 = _pairs(8)
    WeightGenerator(_tiny(max_steps=7)).fit(cond, w, w0, ckpt_dir=tmp_path, progress=False)
    (ckpt,) = tmp_path.glob("step-*.safetensors")
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(BundleError, match="sha256"):
        WeightGenerator(_tiny(max_steps=14)).fit(cond, w, w0, ckpt_dir=tmp_path, progress=False)


def test_checkpoint_for_other_data_is_ignored(tmp_path):
    cond, w, w0 = _pairs(8)
    WeightGenerator(_tiny(max_steps=7)).fit(cond, w, w0, ckpt_dir=tmp_path, progress=False)
    gen = WeightGenerator(_tiny(max_steps=3))
    with pytest.warns(UserWarning, match="other data"):
        gen.fit(cond, w + 1, w0, ckpt_dir=tmp_path, progress=False)
    assert gen.steps_trained == 3


def test_warm_start_from_a_smaller_edit_set(trained):
    gen, _ = trained
    cond, w, w0 = _pairs(20)
    warm = WeightGenerator(_tiny(max_steps=1, lr=1e-12, warmup_steps=0))
    warm.fit(cond, w, w0, init_from=gen, progress=False)
    for a, b in zip(warm.ema.state_dict().values(), gen.ema.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ConfigError, match="init_from"):
        WeightGenerator(_tiny(denoiser="mlp")).fit(cond, w, w0, init_from=gen, progress=False)


def test_normalisation_round_trip_and_std_floor():
    cond, w, w0 = _pairs(8)
    w[:, 0] = w0[0] + 1.0  # a coordinate that never varies
    gen = WeightGenerator(_tiny(max_steps=1))
    gen.fit(cond, w, w0, progress=False)
    assert gen.std[0] > 0
    assert torch.allclose(gen.denormalise(gen.normalise(w)), w, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [("denoiser", "unet"), ("patch_size", -1), ("head_width", -2), ("lr_schedule", "step"), ("lr_min_ratio", 1.0),
     ("token_cond", 1), ("loss_weighting", "snr"), ("cond_noise", -0.1), ("cond_noise_gap", -1),
     ("heads", 3), ("cond_dropout", 1.0), ("beta_schedule", "cubic"),
     ("prediction_type", "x"), ("sampler", "euler"), ("lr", -1.0), ("ema_decay", 1.5), ("target_error", 0),
     ("sample_steps", 5000), ("max_steps", 1.5), ("device", "nowhere"), ("dtype", "int8")],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        GeneratorConfig(**{field: value})


def test_jitter_radius_stays_within_the_gap_to_other_edits():
    """Close conditions of different edits jitter less than half their distance; lone ones the full noise."""
    base = F.normalize(torch.randn(3, C, generator=torch.Generator().manual_seed(0)), dim=1)
    close = F.normalize(base[0] + 0.05 * F.normalize(torch.randn(C), dim=0), dim=0)  # another edit's prompt, nearby
    cond = torch.cat([base, close[None], base[2:3]])  # row 4: a rewording of edit 2 (same weights)
    w = torch.tensor([[0.0], [1.0], [2.0], [3.0], [2.0]]).expand(-1, D).contiguous()
    r = jitter_radius(cond, w, 0.5, 0.5)
    gap = (cond[0] - cond[3]).norm()
    assert torch.allclose(r[[0, 3]], 0.5 * gap.expand(2), atol=1e-4) and r[0] < 0.05
    assert r[1] == 0.5  # far from every other edit
    assert torch.equal(jitter_radius(cond, w, 0.5, 0.0), torch.full((5,), 0.5))
    # identical conditions of one edit do not limit each other: rows 2 and 4 share their weights
    assert r[2] == r[4] and r[2] > 0.1


def test_epsilon_needs_a_bounded_weighting():
    with pytest.raises(ConfigError, match="'loss_weighting'"):
        GeneratorConfig(prediction_type="epsilon")
    GeneratorConfig(prediction_type="epsilon", loss_weighting="min_snr")


def test_guidance_needs_condition_dropout():
    with pytest.raises(ConfigError, match="'guidance_scale'"):
        GeneratorConfig(guidance_scale=2.0, cond_dropout=0.0)


def test_presets_and_unknown_settings():
    for size in PRESETS:
        for denoiser in ("dit", "mlp"):
            cfg = GeneratorConfig.from_preset(size, denoiser=denoiser)
            assert cfg.width == PRESETS[size][denoiser]["width"] and cfg.denoiser == denoiser
    with pytest.raises(ConfigError, match="'size'"):
        GeneratorConfig.from_preset("xxl")
    with pytest.raises(ConfigError, match="'colour'"):
        GeneratorConfig.from_dict({"colour": "red"})


def test_bad_inputs_are_refused(trained):
    gen, cond = trained
    with pytest.raises(ConfigError, match="'sampler'"):
        gen.sample(cond[:1], sampler="euler")
    with pytest.raises(ConfigError, match="conditions"):
        gen.sample(torch.randn(2, C + 1))
    with pytest.raises(ConfigError, match="mismatched"):
        WeightGenerator(_tiny()).fit(cond, torch.randn(3, D), torch.zeros(D), progress=False)


def test_rank_error_analysis_of_the_capacity_benchmark():
    from bench.generator_fit import rank_errors

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, generator=g)
    low = torch.randn(600, 128, generator=g) @ torch.randn(128, 300, generator=g)  # rank 128 around a shared mean
    errors = rank_errors(w0 + 3.0 + low, w0)
    assert errors[64] > 0.1 and errors[128] < 1e-6  # exact from the true rank on, not below it
    assert list(errors) == [64, 128, 256]


def test_a_warm_started_run_is_capped_at_a_quarter_of_max_steps_unless_set():
    from meg.stages.generator import warm_step_cap

    assert warm_step_cap(None, 400) == 100
    assert warm_step_cap(None, 3000) == 750
    assert warm_step_cap(None, 5) == 2 and warm_step_cap(None, 1) == 1
    assert warm_step_cap(6, 400) == 6
