"""Pipeline settings: ``params.yaml``, one section per stage, each loaded into a typed config.

The file has one section per stage (``prepare``, ``fit``, ``encoder``, ``router``, ``generator``,
``attach``, ``evaluate``, ``promote``) plus ``base`` (the base model and device every model-running
stage shares). ``load_params`` reads and validates the whole file: a key that no config knows, a
value of the wrong type or out of range is a ConfigError naming the file, the section and the key.

``STAGE_PARAMS`` says which keys each stage reads. It is the single source of truth: dvc.yaml lists
exactly these keys (a test checks it), and a stage receives only these keys (``stage_view``). Keys
it does not receive take the library defaults, which cannot change its outputs, because anything
that could is declared. So a changed setting reruns only the stages that read it.

Mapping to the library's ``MegConfig`` (``meg_config``):

    fit.*                      -> MegConfig.fit (FitConfig)
    encoder.n_pseudo           -> n_pseudo_encoder;     encoder.* (others) -> MegConfig.encoder
    router.kind                -> MegConfig.router;     router.n_pseudo    -> n_pseudo_calibration
    router.* (others)          -> router_options (RouterConfig)
    generator.weights          -> weights;              generator.variants -> generator_variants
    generator.condition        -> generator_condition
    generator.* (others but warm_*)   -> MegConfig.generator (GeneratorConfig)
    prepare.rewordings         -> rewrite.source;       prepare.pseudo_context -> pseudo_context
    attach.sample_seed         -> sample_seed;          base.device        -> every device field
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from meg.errors import ConfigError


STAGES = ("prepare", "fit", "encoder", "router", "generator", "attach", "evaluate", "promote")

# What each stage reads: whole sections, or "section.key" for a single key.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("base", "prepare"),
    "fit": ("base", "fit"),
    "encoder": ("base.device", "encoder"),
    "router": ("base.device", "encoder.n_pseudo", "router"),
    "generator": ("base.device", "fit.n_variants", "fit.edit_templates", "generator"),
    "attach": ("base", "fit", "encoder", "router", "generator", "attach"),
    "evaluate": ("base", "evaluate"),
    "promote": ("base", "evaluate.batch_size", "promote"),
}


# ---------------------------------------------------------------------------------- stage configs


@dataclass
class BaseConfig:
    model: str = "smollm2-135m"  # registry name (meg.lm.SOURCES), local model directory or hub id
    device: str = "cpu"  # where every stage runs its models ("cpu", "cuda", "cuda:1", ...)

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("base: bad value for 'model': empty")
        import torch

        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"base: bad value for 'device': {self.device!r} ({e})") from e


@dataclass
class PrepareConfig:
    data_dir: str = "data"  # the raw facts (tracked by data.dvc), relative to the repository
    dataset: str = "counterfact"  # benchmark the edit set starts from: "counterfact" or "zsre"
    split: str = "edit"  # split of that benchmark
    offset: int = 0  # first record of the slice
    n_edits: int = 1000  # records in the slice (0: none, only the fact store)
    facts_dir: str = "facts"  # the versioned fact store under data_dir (meg facts add); read in file order
    label_batch_size: int = 32  # prompts per batch when the base model answers the locality prompts
    # where the rewordings of edits and pseudo-edits come from (meg.rewrite): "model" (the base model writes them)
    # or "frames" (fixed frames around the prompt, no model call: for tests on random models)
    rewordings: str = "model"
    # pseudo-edit paraphrases keep their record's leading context sentences (meg.editor.MegConfig.pseudo_context)
    pseudo_context: bool = True

    def __post_init__(self) -> None:
        from meg.facts import BENCHMARKS

        if self.rewordings not in ("model", "frames"):
            raise ConfigError(f"prepare: bad value for 'rewordings': {self.rewordings!r} (model, frames)")
        if (self.dataset, self.split) not in BENCHMARKS:
            known = ", ".join(f"{d}/{s}" for d, s in BENCHMARKS)
            raise ConfigError(f"prepare: bad value for 'dataset'/'split': {self.dataset}/{self.split} (known: {known})")
        for name, low in (("offset", 0), ("n_edits", 0), ("label_batch_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"prepare: bad value for '{name}': {getattr(self, name)!r} (an integer >= {low})")


@dataclass
class AttachConfig:
    sample_seed: int = 0  # seed of the generator's sampling noise (answers are deterministic)
    exact_prompts: bool = True  # an edit's own prompt is answered with its fitted weights, not generated ones


@dataclass
class EvaluateConfig:
    methods: list[str] = field(default_factory=lambda: ["none", "ft"])  # baselines beside the bundle ("meg")
    batch_size: int = 32  # prompts per forward pass

    def __post_init__(self) -> None:
        from meg.editors import EDITORS

        known = sorted(set(EDITORS) - {"meg"})
        for m in self.methods:
            if m not in known:
                raise ConfigError(f"evaluate: bad value in 'methods': {m!r} (known: {', '.join(known)}; "
                                  "the bundle itself is always evaluated as 'meg')")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"evaluate: bad value for 'methods': {self.methods!r} (a method appears twice)")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate: bad value for 'batch_size': {self.batch_size!r} (an integer >= 1)")


@dataclass
class PromoteConfig:
    model_name: str = "meg-editor"  # registered model name
    alias: str = "champion"  # the alias that marks the served version
    min_score: float = 50.0  # gate: Score (harmonic mean of the six numbers, 0-100) at least this
    min_locality: float = 70.0  # gate: Locality (AG, 0-100) at least this
    min_gain: float = 0.0  # the candidate's Score must exceed the champion's by more than this

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.model_name):
            raise ConfigError(f"promote: bad value for 'model_name': {self.model_name!r}")
        if not re.fullmatch(r"[A-Za-z_][\w-]*", self.alias) or self.alias.lower() == "latest":
            raise ConfigError(f"promote: bad value for 'alias': {self.alias!r} (letters, digits, _ and -; not 'latest')")
        for name in ("min_score", "min_locality"):
            if not 0 <= getattr(self, name) <= 100:
                raise ConfigError(f"promote: bad value for '{name}': {getattr(self, name)!r} (0-100)")
        if self.min_gain < 0:
            raise ConfigError(f"promote: bad value for 'min_gain': {self.min_gain!r} (>= 0)")


# Extra keys a section has beside the fields of the library config it feeds.
_EXTRA_KEYS: dict[str, dict[str, Any]] = {
    "encoder": {"n_pseudo": 5000},  # train-split pseudo-edits the encoder is fine-tuned on
    "router": {"kind": "nearest", "n_pseudo": 2000},  # router kind; held-out pseudo-edits for its threshold
    # weights: "lookup" (the routed edit's fitted weights) or "generator" (MeG); variants: also train on
    # rewordings; warm_start: start from the previous generator when facts were added; warm_max_steps: step cap of such a run (null: a quarter of max_steps);
    # condition: what the generator is conditioned on ("tuned" encoder embedding, or "tuned+base": with the base one)
    "generator": {"weights": "lookup", "variants": True, "condition": "tuned+base", "warm_start": True,
                  "warm_max_steps": None},
}
_EXTRA_TYPES: dict[str, Any] = {"n_pseudo": int, "kind": str, "weights": str, "variants": bool, "condition": str,
                                "warm_start": bool, "warm_max_steps": int | None}


def _library_classes() -> dict[str, type]:
    from meg.encoder import EncoderConfig
    from meg.fit import FitConfig
    from meg.generator import GeneratorConfig
    from meg.router import RouterConfig

    return {
        "base": BaseConfig, "prepare": PrepareConfig, "fit": FitConfig, "encoder": EncoderConfig,
        "router": RouterConfig, "generator": GeneratorConfig, "attach": AttachConfig,
        "evaluate": EvaluateConfig, "promote": PromoteConfig,
    }


def _own_fields(cls: type, section: str) -> list[str]:
    """The params keys of a section taken from its config class (device comes from base)."""
    skip = {"device"} if section != "base" else set()
    if section == "router":
        skip.add("kind")
    return [f.name for f in fields(cls) if f.name not in skip]


def default_params() -> dict[str, dict[str, Any]]:
    """params.yaml with every key at the library's default (MegConfig's where it has its own)."""
    from meg.editor import MegConfig

    meg = MegConfig()
    out: dict[str, dict[str, Any]] = {}
    for section, cls in _library_classes().items():
        instance = cls()
        if section == "fit":
            instance = meg.fit
        values = {k: getattr(instance, k) for k in _own_fields(cls, section)}
        extra = dict(_EXTRA_KEYS.get(section, {}))
        if section == "encoder":
            extra["n_pseudo"] = meg.n_pseudo_encoder
            values.update(meg.encoder)
        elif section == "router":
            extra.update(kind=meg.router, n_pseudo=meg.n_pseudo_calibration)
            values.update(meg.router_options)
        elif section == "generator":
            extra.update(weights=meg.weights, variants=meg.generator_variants, condition=meg.generator_condition)
            values.update(meg.generator)
        elif section == "attach":
            values["sample_seed"] = meg.sample_seed
        out[section] = {**extra, **values}
    return out


# ---------------------------------------------------------------------------------- validation


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _check_section(where: str, section: str, values: Any) -> None:
    """Names, types and values of one section; raises ConfigError naming the bad key."""
    cls = _library_classes()[section]
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section '{section}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    extra = _EXTRA_KEYS.get(section, {})
    known = set(_own_fields(cls, section)) | set(extra)
    for key, value in values.items():
        if key not in known:
            hint = " (set the device once, in section 'base')" if key == "device" else ""
            raise ConfigError(f"{where}: {section}: unknown key '{key}'{hint}; known: {', '.join(sorted(known))}")
        hint_t = _EXTRA_TYPES[key] if key in extra else hints[key]
        if not _type_ok(value, hint_t):
            raise ConfigError(f"{where}: {section}: bad value for '{key}': {value!r} "
                              f"(expected {_type_name(hint_t)})")
    for key in sorted(known - set(values)):
        raise ConfigError(f"{where}: {section}: missing key '{key}'")
    if section == "generator" and values["weights"] not in ("generator", "lookup"):
        raise ConfigError(f"{where}: generator: bad value for 'weights': {values['weights']!r} (generator | lookup)")
    from meg.generator import CONDITIONS

    if section == "generator" and values["condition"] not in CONDITIONS:
        raise ConfigError(f"{where}: generator: bad value for 'condition': {values['condition']!r} "
                          f"({' | '.join(CONDITIONS)})")
    if section == "router" and values["kind"] not in ("nearest", "familiarity", "off"):
        raise ConfigError(f"{where}: router: bad value for 'kind': {values['kind']!r} (nearest | familiarity | off)")
    for key in ("n_pseudo", "warm_max_steps"):
        if key in extra and values[key] is not None and values[key] < 1:
            raise ConfigError(f"{where}: {section}: bad value for '{key}': {values[key]!r} (an integer >= 1)")
    lib = {k: v for k, v in values.items() if k not in extra}
    if section == "router":
        lib["kind"] = values["kind"] if values["kind"] != "off" else "nearest"
    try:
        cls(**lib)  # the config's own checks (ranges, choices)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def validate(params: dict, where: str = "params.yaml") -> dict:
    """Check every section of a params mapping; returns it unchanged."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be a mapping of sections")
    sections = list(_library_classes())
    for name in params:
        if name not in sections:
            raise ConfigError(f"{where}: unknown section '{name}'; known: {', '.join(sections)}")
    for name in sections:
        if name not in params:
            raise ConfigError(f"{where}: missing section '{name}'")
        _check_section(where, name, params[name])
    return params


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read and validate params.yaml."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such settings file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return validate(raw or {}, str(path))


def parse_params(text: str, where: str = "params") -> dict:
    """Validate params given as YAML text (how Kubeflow components receive them)."""
    import yaml

    try:
        return validate(yaml.safe_load(text) or {}, where)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e


# ---------------------------------------------------------------------------------- views


def stage_view(params: dict, stage: str) -> dict:
    """The part of ``params`` a stage reads (STAGE_PARAMS), as a nested mapping."""
    if stage not in STAGE_PARAMS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    view: dict[str, dict] = {}
    for entry in STAGE_PARAMS[stage]:
        section, _, key = entry.partition(".")
        if key:
            view.setdefault(section, {})[key] = copy.deepcopy(params[section][key])
        else:
            view[section] = copy.deepcopy(params[section])
    return view


def base_config(view: dict) -> BaseConfig:
    return BaseConfig(**{**asdict(BaseConfig()), **view.get("base", {})})


def section_config(view: dict, section: str):
    """The stage config of an own section (prepare, attach, evaluate, promote) from a view."""
    cls = {"prepare": PrepareConfig, "attach": AttachConfig, "evaluate": EvaluateConfig,
           "promote": PromoteConfig}[section]
    return cls(**view.get(section, {}))


def meg_config(view: dict):
    """The library's MegConfig from a stage view; keys outside the view keep their defaults."""
    from meg.editor import MegConfig

    device = view.get("base", {}).get("device", BaseConfig.device)
    defaults = MegConfig()
    fit_cfg = dataclasses.replace(defaults.fit, **view.get("fit", {}), device=device)
    enc = dict(view.get("encoder", {}))
    router = dict(view.get("router", {}))
    gen = dict(view.get("generator", {}))
    kw: dict[str, Any] = dict(fit=fit_cfg, device=device)
    if "n_pseudo" in enc:
        kw["n_pseudo_encoder"] = enc.pop("n_pseudo")
    kw["encoder"] = {**defaults.encoder, **enc}
    if "kind" in router:
        kw["router"] = router.pop("kind")
    if "n_pseudo" in router:
        kw["n_pseudo_calibration"] = router.pop("n_pseudo")
    kw["router_options"] = {**defaults.router_options, **router}
    if "weights" in gen:
        kw["weights"] = gen.pop("weights")
    if "variants" in gen:
        kw["generator_variants"] = gen.pop("variants")
    if "condition" in gen:
        kw["generator_condition"] = gen.pop("condition")
    gen.pop("warm_start", None)
    gen.pop("warm_max_steps", None)
    kw["generator"] = {**defaults.generator, **gen}
    if "rewordings" in view.get("prepare", {}):
        kw["rewrite"] = {**defaults.rewrite, "source": view["prepare"]["rewordings"]}
    if "pseudo_context" in view.get("prepare", {}):
        kw["pseudo_context"] = view["prepare"]["pseudo_context"]
    for key in ("sample_seed", "exact_prompts"):
        if key in view.get("attach", {}):
            kw[key] = view["attach"][key]
    return MegConfig(**kw)


def flat(view: dict) -> dict[str, Any]:
    """``{"fit.lr": 2.0, ...}``: a view as dotted keys (for logging)."""
    return {f"{s}.{k}": v for s, values in view.items() for k, v in values.items()}
