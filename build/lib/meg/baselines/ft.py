"""Fine-tuning baseline: train the FFN of one layer on the edit prompts (all edits at once).

The FFN weights of the chosen layer are optimised with Adam on cross-entropy over the target
tokens (prompt tokens not scored), in mini-batches, for a fixed number of epochs; an optional
L-infinity bound keeps every weight within ``norm_bound`` of its original value (the constrained
variant used by ROME's comparisons). ``close()`` copies the original weights back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from meg import lm, textbatch
from meg.errors import ConfigError
from meg.evaluate import EditedLM, Editor


@dataclass
class FTConfig:
    layer: int | None = None  # None = the model's registered default layer
    lr: float = 5e-4  # Adam step size
    epochs: int = 10  # passes over the edits
    batch_size: int = 32  # edits per step
    norm_bound: float = 0.0  # max |change| per weight; 0 = unconstrained
    suffix: str = "\n"  # fitted after the target, as for MeG
    seed: int = 0

    def __post_init__(self) -> None:
        for name, ok in {"lr": self.lr > 0, "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                         "norm_bound": self.norm_bound >= 0}.items():
            if not ok:
                raise ConfigError(f"ft: bad value for '{name}': {getattr(self, name)!r}")


class FineTune(Editor):
    name = "ft"

    def __init__(self, cfg: FTConfig | None = None):
        self.cfg = cfg or FTConfig()

    def apply(self, loaded: lm.LoadedModel, edits) -> EditedLM:
        cfg, model, tok = self.cfg, loaded.model, loaded.tokenizer
        layer = cfg.layer if cfg.layer is not None else loaded.default_layer
        ffn = lm.ffn_module(model, layer)
        params = [p for p in ffn.parameters()]
        original = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        order = list(range(len(edits)))
        rng = random.Random(cfg.seed)
        try:
            for _ in range(cfg.epochs):
                rng.shuffle(order)
                for i in range(0, len(order), cfg.batch_size):
                    chunk = [edits[j] for j in order[i : i + cfg.batch_size]]
                    batch = textbatch.encode(tok, [e.prompt for e in chunk], [e.target_new for e in chunk], cfg.suffix)
                    logits = textbatch.logits_at(model, batch.to(model.device))
                    loss = torch.nn.functional.cross_entropy(logits, batch.labels)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if cfg.norm_bound:
                        with torch.no_grad():
                            for p, p0 in zip(params, original):
                                p.copy_(torch.clamp(p, p0 - cfg.norm_bound, p0 + cfg.norm_bound))
        finally:
            for p in params:
                p.requires_grad_(False)

        def restore() -> None:
            with torch.no_grad():
                for p, p0 in zip(params, original):
                    p.copy_(p0)

        return EditedLM(loaded, restore=restore)
