"""A small real edit bundle on a tiny random Llama, built once per test process (about 5 s).

Eight CounterFact edits, the frozen MiniLM encoder, the nearest-edit router calibrated on 64
pseudo-edits, a small DiT generator: every part of MeG runs, only smaller.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

N_EDITS = 8
UNRELATED = ("The capital of France is", "Who wrote Hamlet? It was", "Water boils at a temperature of")


def tiny_config():
    from meg import fit
    from meg.editor import MegConfig

    return MegConfig(
        fit=fit.FitConfig(n_variants=0, max_steps=40, optimizer="adam", lr=0.1),
        encoder={"trainable": "none"},
        n_pseudo_encoder=64,
        n_pseudo_calibration=64,
        generator={"max_steps": 150, "eval_every": 50, "width": 64, "heads": 4, "depth": 2, "sample_steps": 10},
        generator_variants=False,
        weights="generator",  # the bundle tests exercise the diffusion generator
        rewrite={"source": "frames"},  # no model call: a random model writes no rewording worth keeping
    )


def tiny_edits():
    from meg.facts import load_benchmark

    return load_benchmark("counterfact", "edit")[:N_EDITS]


@lru_cache(maxsize=None)
def tiny_bundle(family: str = "llama") -> Path:
    """Path of the bundle (deleted when the process exits); ``EditedModel.load(path)`` finds its base model."""
    from meg import editor
    from meg.bundle import record_edits

    edits = tiny_edits()
    model = editor.build(tiny_loaded(family), edits, tiny_config(), progress=False)
    record_edits(model, edits)
    root = Path(tempfile.mkdtemp(prefix="meg-tiny-bundle-"))
    atexit.register(shutil.rmtree, root, True)
    return model.save(root / "bundle")


@lru_cache(maxsize=None)
def tiny_loaded(family: str = "llama"):
    """The tiny model, loaded from its directory: bundles built on it name a base model anyone can load."""
    from meg import lm

    return lm.load_model(str(tiny_model_dir(family)))


@lru_cache(maxsize=None)
def tiny_model_dir(family: str = "llama") -> Path:
    """The tiny random model saved as a local model directory (loadable by path, like any real model)."""
    from meg import lm

    loaded = lm.tiny_model(family, lm.load_tokenizer(lm.DEFAULT_MODEL))
    root = Path(tempfile.mkdtemp(prefix="meg-tiny-model-"))
    atexit.register(shutil.rmtree, root, True)
    loaded.model.save_pretrained(root)
    loaded.tokenizer.save_pretrained(root)
    return root


def tiny_config_dict() -> dict:
    """tiny_config() as the JSON a `meg edit --config` file holds."""
    from dataclasses import asdict

    return asdict(tiny_config())
