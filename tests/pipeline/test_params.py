"""params.yaml: one validated section per stage, and dvc.yaml declaring exactly what each stage reads."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from meg import config
from meg.errors import ConfigError
from tests.pipeline.conftest import ROOT

# Keys where the repository's params.yaml deliberately departs from the library defaults to keep the
# demo within its time budget (each is marked "demo:" in the file).
DEMO_KEYS = {("prepare", "n_edits"), ("encoder", "n_pseudo"), ("generator", "max_steps")}


def repo_params() -> dict:
    return config.load_params(ROOT / "params.yaml")


def test_repository_params_are_valid_and_the_library_defaults_except_the_demo_sizes():
    params, defaults = repo_params(), config.default_params()
    assert set(params) == set(defaults)
    differ = {(s, k) for s in params for k in params[s] if params[s][k] != defaults[s][k]}
    assert differ == DEMO_KEYS, "only the documented demo sizes may differ from the library defaults"
    text = (ROOT / "params.yaml").read_text()
    for section, key in DEMO_KEYS:
        line = next(l for l in text.splitlines() if l.strip().startswith(f"{key}:") and "demo:" in l)
        assert line


def test_defaults_validate_and_rebuild_megconfig():
    from meg.editor import MegConfig
    from meg.encoder import EncoderConfig
    from meg.generator import GeneratorConfig
    from meg.router import RouterConfig

    params = config.default_params()
    config.validate(params)
    got, want = config.meg_config(params), MegConfig()
    # the same settings, spelled out key by key instead of left to the defaults
    assert EncoderConfig(**got.encoder) == EncoderConfig(**want.encoder)
    assert RouterConfig(kind=got.router, **got.router_options) == RouterConfig(kind=want.router, **want.router_options)
    assert GeneratorConfig(**got.generator) == GeneratorConfig(**want.generator)
    for name in ("fit", "weights", "generator_variants", "generator_condition", "n_pseudo_encoder",
                 "n_pseudo_calibration", "sample_seed", "device", "router"):
        assert getattr(got, name) == getattr(want, name), name


@pytest.mark.parametrize("section,key,value,needle", [
    ("fit", "lrr", 1.0, "fit: unknown key 'lrr'"),
    ("fit", "device", "cpu", "set the device once, in section 'base'"),
    ("fit", "lr", "fast", "fit: bad value for 'lr': 'fast'"),
    ("fit", "lr", -1.0, "fit: bad value for 'lr'"),
    ("generator", "max_steps", 2.5, "generator: bad value for 'max_steps'"),
    ("generator", "sampler", "euler", "generator: bad value for 'sampler'"),
    ("generator", "weights", "table", "generator: bad value for 'weights'"),
    ("generator", "condition", "base", "generator: bad value for 'condition'"),
    ("generator", "warm_max_steps", 0, "generator: bad value for 'warm_max_steps'"),
    ("encoder", "trainable", "some", "encoder: bad value for 'trainable'"),
    ("router", "kind", "oracle", "router: bad value for 'kind'"),
    ("prepare", "dataset", "wikidata", "prepare: bad value for 'dataset'"),
    ("evaluate", "methods", ["none", "rome2"], "evaluate: bad value in 'methods': 'rome2'"),
    ("promote", "min_score", 120.0, "promote: bad value for 'min_score'"),
    ("promote", "alias", "latest", "promote: bad value for 'alias'"),
])
def test_a_bad_key_or_value_is_an_error_naming_it(tmp_path, section, key, value, needle):
    params = config.default_params()
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as e:
        config.load_params(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_missing_and_unknown_sections_and_keys(tmp_path):
    params = config.default_params()
    del params["router"]["objective"]
    with pytest.raises(ConfigError, match="router: missing key 'objective'"):
        config.validate(params)
    params = config.default_params()
    params["deploy"] = {}
    with pytest.raises(ConfigError, match="unknown section 'deploy'"):
        config.validate(params)
    with pytest.raises(ConfigError, match="no such settings file"):
        config.load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("fit: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_params(tmp_path / "bad.yaml")


def test_dvc_yaml_lists_exactly_the_keys_each_stage_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(config.STAGES)
    for stage, spec in dvc["stages"].items():
        assert tuple(spec["params"]) == config.STAGE_PARAMS[stage], stage
        assert spec["cmd"].startswith(f"python -m meg.cli {stage}")


def test_stage_view_holds_only_declared_keys():
    params = repo_params()
    view = config.stage_view(params, "router")
    assert set(view) == {"base", "encoder", "router"}
    assert view["encoder"] == {"n_pseudo": params["encoder"]["n_pseudo"]}
    assert view["base"] == {"device": "cpu"}
    cfg = config.meg_config(view)
    assert cfg.n_pseudo_calibration == params["router"]["n_pseudo"]
    assert cfg.n_pseudo_encoder == params["encoder"]["n_pseudo"]
    assert cfg.router == "nearest" and "kind" not in cfg.router_options and "n_pseudo" not in cfg.router_options


def test_a_view_cannot_see_other_sections():
    params = copy.deepcopy(repo_params())
    params["generator"]["lr"] = 0.5
    before = config.stage_view(repo_params(), "fit")
    after = config.stage_view(params, "fit")
    assert before == after  # a generator setting is invisible to the fit stage


def test_meg_config_maps_generator_extras():
    view = config.stage_view(repo_params(), "attach")
    view["generator"].update(weights="lookup", variants=False, warm_start=False, warm_max_steps=5)
    view["attach"]["sample_seed"] = 7
    cfg = config.meg_config(view)
    assert cfg.weights == "lookup" and cfg.generator_variants is False and cfg.sample_seed == 7
    assert not {"weights", "variants", "warm_start", "warm_max_steps"} & set(cfg.generator)


def test_params_defaults_command_prints_a_valid_full_size_file(tmp_path, capsys):
    from meg import cli

    # its own process: the file is exactly what the command prints, whatever else this process prints
    run = subprocess.run([sys.executable, "-m", "meg.cli", "params", "defaults"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    path = tmp_path / "params.yaml"
    path.write_text(run.stdout)
    assert config.load_params(path) == config.default_params()
    assert cli.main(["params", "check", str(path)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("n_edits: 1000", "n_edits: many"))
    assert cli.main(["params", "check", str(bad)]) == 2
    assert "prepare: bad value for 'n_edits': 'many'" in capsys.readouterr().err
