"""Shared fixtures: the real SmolLM2 tokenizer (cached once per machine) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")

# The tiers (docs/operations.md, "Tests"): unit (pure functions, no model files), component (a tiny random
# model or the tokenizer), pipeline (real DVC, MLflow, kfp, S3), slow (kills, store faults, the real model).
MODEL_FIXTURES = {"tokenizer", "tiny_models", "smollm2", "tiny_bundle", "bundle", "loaded"}
TIER_OF_DIR = {"pipeline": "pipeline", "reliability": "slow", "integration": "slow"}


MODEL_CALLS = ("tiny_model(", "tiny_bundle", "tiny_loaded", "load_model(", "load_tokenizer(", "tiny_models")


def _loads_models(path, seen: dict = {}) -> bool:  # noqa: B006 (a per-run cache)
    """Whether a test module builds or loads a model anywhere (its fixtures included)."""
    if path not in seen:
        text = path.read_text(encoding="utf-8")
        seen[path] = any(call in text for call in MODEL_CALLS)
    return seen[path]


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        tier = next((TIER_OF_DIR[d] for d in TIER_OF_DIR if d in parts), None)
        if tier is None:
            fixtures = set(getattr(item, "fixturenames", ()))
            component = fixtures & MODEL_FIXTURES or item.get_closest_marker("component") or _loads_models(item.path)
            tier = "component" if component else "unit"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tokenizer():
    from meg import lm

    return lm.load_tokenizer(lm.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    from meg import lm

    return {f: lm.tiny_model(f, tokenizer) for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    from meg import lm

    return lm.load_model(lm.DEFAULT_MODEL)


def make_edit(i: int, prompt: str, target: str, para: str | None = None, loc: str | None = None, old: str | None = None):
    from meg.facts import EditRequest, Probe

    return EditRequest(
        id=f"t-{i}",
        prompt=prompt,
        target_new=target,
        target_old=old,
        subject=None,
        paraphrases=(para,) if para else (),
        locality=(Probe(loc, None),) if loc else (),
        portability=(),
        source=f"test:record {i}",
    )
