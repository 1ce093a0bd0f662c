"""Shared fixtures: the real SmolLM2 tokenizer (cached once per machine) and tiny random models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")


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
