"""Fine-tuning baseline: train the FFN of one layer on the edit prompts (all edits at once).

The FFN weights of the chosen layer are optimised with Adam on cross-entropy over the target
tokens (prompt tokens not scored), in mini-batches, for a fixed number of epochs; an optional
L-infinity bound keeps every weight within ``norm_bound`` of its original value (the constrained
variant used by ROME's comparisons). ``close()`` copies the original weights back.

Training shows progress (steps, loss) and is checkpointed after every epoch (the FFN's weights,
Adam's state, the epoch) under ``$MEG_HOME/baselines/ft/<key of model, edits and settings>``, so
an interrupted run resumes at its last finished epoch, and a finished one is not trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

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
    cache: bool = True  # checkpoint every epoch under $MEG_HOME/baselines/ft (resume)
    progress: bool = True

    def key(self, model_hash: str, layer: int, edit_keys: list[str]) -> str:
        settings = {k: v for k, v in asdict(self).items() if k not in ("cache", "progress")}
        blob = json.dumps({"model": model_hash, "layer": layer, "edits": edit_keys, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        for name, ok in {"lr": self.lr > 0, "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                         "norm_bound": self.norm_bound >= 0}.items():
            if not ok:
                raise ConfigError(f"ft: bad value for '{name}': {getattr(self, name)!r}")


class FineTune(Editor):
    name = "ft"
    label = "fine-tuning"

    def __init__(self, cfg: FTConfig | None = None):
        self.cfg = cfg or FTConfig()

    def apply(self, loaded: lm.LoadedModel, edits) -> EditedLM:
        cfg, model, tok = self.cfg, loaded.model, loaded.tokenizer
        layer = cfg.layer if cfg.layer is not None else loaded.default_layer
        ffn = lm.ffn_module(model, layer)
        params = [p for p in ffn.parameters()]
        original = [p.detach().clone() for p in params]

        def restore() -> None:
            with torch.no_grad():
                for p, p0 in zip(params, original):
                    p.copy_(p0)

        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        order = list(range(len(edits)))
        rng = random.Random(cfg.seed)
        ckpt = None
        if cfg.cache:
            key = cfg.key(loaded.content_hash, layer, [e.content_key for e in edits])
            ckpt = lm.meg_home() / "baselines" / "ft" / key / "checkpoint.pt"
        start = _resume(ckpt, params, opt)
        steps_per_epoch = -(-len(edits) // cfg.batch_size)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start * steps_per_epoch, desc=f"ft L{layer}",
                   unit="step", disable=not cfg.progress, mininterval=5.0)
        try:
            for epoch in range(cfg.epochs):
                rng.shuffle(order)  # also for the epochs a resumed run skips: the same orders follow
                if epoch < start:
                    continue
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
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
                if ckpt is not None:
                    _checkpoint(ckpt, epoch + 1, params, opt)
        except BaseException:
            restore()  # the base model comes back whole; finished epochs stay in the checkpoint
            raise
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
        return EditedLM(loaded, restore=restore)


def _checkpoint(path: Path, epochs_done: int, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"epochs_done": epochs_done, "params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp)
    os.replace(tmp, path)


def _resume(path: Path | None, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """Load a checkpoint into ``params`` and ``opt``; returns the epochs it had finished (0 without one)."""
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    opt.load_state_dict(state["opt"])
    return int(state["epochs_done"])
