"""MEMIT's target vectors: for every edit, the residual z_i at the last edited layer L that makes
the model say the new target (shared by MEMIT and AlphaEdit).

For edit i with lookup position p (the subject's last token), z_i = h_i^L + delta_i, where delta_i
is optimised with Adam on

    NLL(target + suffix | each context row)  averaged over the rows: the bare prompt and the
                                              prompt behind each random context prefix
  + kl_factor * KL(P_delta || P_0)            next-token distribution at p of "{subject} is a"
                                              (the "essence" of the subject is kept)
  + weight_decay * |delta| / |h^L|^2

with delta added to block L's output at p in every row, and |delta| clamped to
clamp_norm_factor * |h^L| after each step. An edit stops when its loss falls below ``stop_loss``
(MEMIT's early stop). Edits without a subject have no essence row (there is no subject to keep).

Edits are optimised in chunks, independently (per-edit losses are summed and the optimiser acts
element by element, so each edit's trajectory equals optimising it alone). Each row's tokens before
the lookup token are computed once and cached (``meg.baselines.suffix``); each step runs only the
rest of the row through layers L+1.. Finished z are stored per edit
(content key) under a key of the model hash, layer and settings, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from meg import fit, lm, textbatch
from meg.baselines import locate, suffix
from meg.errors import ConfigError

if TYPE_CHECKING:
    from meg.facts import EditRequest

ESSENCE = "{} is a"  # MEMIT's prompt for the KL term


@dataclass
class TargetConfig:
    steps: int = 25  # Adam steps on delta at most
    lr: float = 0.5  # Adam step size
    weight_decay: float = 0.5  # on |delta| / |h|^2
    clamp_norm_factor: float = 0.75  # |delta| <= factor * |h|
    kl_factor: float = 0.0625  # weight of the essence KL term
    stop_loss: float = 5e-2  # an edit is done when its loss is below this
    n_prefixes: int = 5  # random context prefixes (rows per edit = 1 + n_prefixes)
    prefix_tokens: int = 10  # tokens per prefix, sampled from the base model
    suffix: str = "\n"  # fitted after the target, as for MeG and FT
    chunk_size: int = 16  # edits optimised together
    seed: int = 0  # of the context prefixes

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "clamp_norm_factor", "kl_factor", "stop_loss"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))  # 4 and 4.0 are one setting, and one store key
        checks = {"steps": self.steps >= 1, "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0,
                  "clamp_norm_factor": self.clamp_norm_factor > 0, "kl_factor": self.kl_factor >= 0,
                  "stop_loss": self.stop_loss >= 0, "n_prefixes": self.n_prefixes >= 0,
                  "prefix_tokens": self.prefix_tokens >= 1, "chunk_size": self.chunk_size >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"target: bad value for '{name}': {getattr(self, name)!r}")

    def key(self, model_hash: str, layer: int, prefixes: list[str]) -> str:
        settings = {k: v for k, v in asdict(self).items() if k != "chunk_size"}
        blob = json.dumps({"model": model_hash, "layer": layer, "prefixes": prefixes, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def templates(loaded: lm.LoadedModel, cfg: TargetConfig) -> list[str]:
    """The context prefixes: "" (the bare prompt) first, then the sampled ones."""
    return [""] + fit.context_prefixes(loaded, cfg.n_prefixes, cfg.prefix_tokens, cfg.seed)


@dataclass
class _Chunk:
    rows: suffix.SplitRows  # every row, split at its lookup token (tail column 0)
    pos_row: torch.Tensor  # (N,) row of each scored position
    pos_col: torch.Tensor  # (N,) its tail column
    labels: torch.Tensor  # (N,) target token (0 at essence positions)
    essence: torch.Tensor  # (N,) bool: an essence lookup (KL term), not a target token
    edit: torch.Tensor  # (R,) edit of each row (index into the chunk)
    bare_row: torch.Tensor  # (E,) row of each edit's bare prompt


def _build(tok, edits: "list[EditRequest]", prefixes: list[str], cfg: TargetConfig) -> _Chunk:
    suffix_ids = tok(cfg.suffix, add_special_tokens=False).input_ids if cfg.suffix else []
    seqs, splits, edit_of, bare = [], [], [], []
    pos_row, pos_col, labels = [], [], []
    for i, e in enumerate(edits):
        target = tok(textbatch.target_text(e.target_new), add_special_tokens=False).input_ids + suffix_ids
        for prefix in prefixes:
            text = locate.with_prefix(prefix, e.prompt)
            p = tok(text, add_special_tokens=True).input_ids
            at = locate.lookup_index(tok, text, e.subject, len(prefix) + 1 if prefix else 0)
            if not prefix:
                bare.append(len(seqs))
            for j, t in enumerate(target):  # position len(p) - 1 + j predicts target token j
                pos_row.append(len(seqs))
                pos_col.append(len(p) - 1 + j - at)
                labels.append(t)
            seqs.append((p + target)[:-1])
            splits.append(at)
            edit_of.append(i)
        if e.subject and cfg.kl_factor > 0:
            text = ESSENCE.format(e.subject)
            pos_row.append(len(seqs))
            pos_col.append(0)
            labels.append(-1)
            seqs.append(tok(text, add_special_tokens=True).input_ids)
            splits.append(locate.lookup_index(tok, text, e.subject))
            edit_of.append(i)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    labels_t = torch.tensor(labels)
    return _Chunk(suffix.split_rows(seqs, splits, pad), torch.tensor(pos_row), torch.tensor(pos_col),
                  labels_t.clamp(min=0), labels_t < 0, torch.tensor(edit_of), torch.tensor(bare))


def adam_rows(w: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, idx: torch.Tensor,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
    """torch.optim.Adam's update, for the rows ``idx`` of ``w`` only (each row its own optimiser)."""
    m, v, t = state["m"], state["v"], state["t"]
    m[idx] = b1 * m[idx] + (1 - b1) * grad
    v[idx] = b2 * v[idx] + (1 - b2) * grad * grad
    t[idx] += 1
    tt = t[idx].unsqueeze(1).float()
    w[idx] -= lr * (m[idx] / (1 - b1**tt)) / ((v[idx] / (1 - b2**tt)).sqrt() + eps)


def _optimise(model, layer: int, chunk: _Chunk, n_edits: int, cfg: TargetConfig):
    """delta per edit of one chunk; returns z (E, D), last and first loss (E,), steps (E,)."""
    heads = suffix.HeadCache(model, chunk.rows)
    hidden = heads.block_output(layer)  # (R, A, D) residual leaving block L at the tail tokens
    z0 = hidden[chunk.bare_row, 0]  # (E, D)
    z0_norm = z0.norm(dim=1)  # (E,)
    delta = torch.zeros_like(z0)
    state = {"m": torch.zeros_like(z0), "v": torch.zeros_like(z0), "t": torch.zeros(n_edits, dtype=torch.long)}
    done = torch.zeros(n_edits, dtype=torch.bool)
    steps = torch.zeros(n_edits, dtype=torch.long)
    final = torch.full((n_edits,), float("nan"))
    first = torch.full((n_edits,), float("nan"))
    init_lp: torch.Tensor | None = None  # (E, V) essence log-probs before editing
    n_rows = chunk.edit.numel()
    for step in range(cfg.steps):
        active = (~done).nonzero().flatten()  # (A,)
        if active.numel() == 0:
            break
        rows = torch.isin(chunk.edit, active).nonzero().flatten()  # (R',)
        new_index = torch.full((n_rows,), -1, dtype=torch.long)
        new_index[rows] = torch.arange(rows.numel())
        keep = new_index[chunk.pos_row] >= 0  # scored positions of those rows
        owner = new_index[chunk.pos_row[keep]]  # (N',) into rows
        remap = torch.full((n_edits,), -1, dtype=torch.long)
        remap[active] = torch.arange(active.numel())
        row_edit = remap[chunk.edit[rows]]  # (R',) index into active
        d = delta[active].clone().requires_grad_(True)  # (A, D)
        h = hidden[rows].clone()
        h[:, 0] += d[row_edit]  # the lookup token is every tail's first
        out = heads.tail_hidden(layer + 1, h, None if rows.numel() == n_rows else rows)  # (R', A, D)
        logp = torch.log_softmax(suffix.logits_of(model, out[owner, chunk.pos_col[keep]]), -1)  # (N', V)
        essence = chunk.essence[keep]
        # NLL: mean over each row's target tokens, then over the edit's rows
        tgt = ~essence
        tok_lp = logp[tgt].gather(1, chunk.labels[keep][tgt, None]).squeeze(1)
        row_nll = -textbatch.per_row_mean(tok_lp, owner[tgt], rows.numel())  # (R',)
        is_target_row = torch.zeros(rows.numel(), dtype=torch.bool)
        is_target_row[owner[tgt]] = True
        nll = torch.zeros(active.numel()).index_add(0, row_edit[is_target_row], row_nll[is_target_row])
        nll = nll / torch.bincount(row_edit[is_target_row], minlength=active.numel()).clamp(min=1)
        kl = torch.zeros(active.numel())
        if essence.any():
            cur = logp[essence]  # (K, V)
            kl_edit = row_edit[owner[essence]]
            if init_lp is None:
                init_lp = torch.zeros(n_edits, cur.shape[1])
                init_lp[active[kl_edit]] = cur.detach()
            ref = init_lp[active[kl_edit]]
            kl = kl.index_add(0, kl_edit, (cur.exp() * (cur - ref)).sum(-1))
        decay = cfg.weight_decay * d.norm(dim=1) / z0_norm[active] ** 2
        loss = nll + cfg.kl_factor * kl + decay  # (A,)
        final[active] = loss.detach()
        if step == 0:
            first[:] = loss.detach()
        finished = loss.detach() < cfg.stop_loss
        done[active[finished]] = True
        train = ~finished
        if step == cfg.steps - 1 or not train.any():
            break
        loss[train].sum().backward()
        idx = active[train]
        with torch.no_grad():
            adam_rows(delta, d.grad[train], state, cfg.lr, idx)
            limit = cfg.clamp_norm_factor * z0_norm[idx]  # (A',)
            norm = delta[idx].norm(dim=1)
            scale = torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm))
            delta[idx] *= scale[:, None]
        steps[idx] += 1
    return z0 + delta, final, first, steps


def target_vectors(loaded: lm.LoadedModel, edits: "list[EditRequest]", layer: int, cfg: TargetConfig,
                   store_dir: Path | None = None, progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """z per edit content key: {"z": (D,), "loss": (), "loss0": (), "steps": ()}; stored ones are reused.

    ``loss0`` is the loss before optimisation, ``loss`` the last one computed.
    """
    if layer + 1 >= lm.num_layers(loaded.model):
        raise ConfigError(f"target: the last edited layer {layer} must be below the model's last layer")
    prefixes = templates(loaded, cfg)
    store = fit.WeightStore(Path(store_dir) / cfg.key(loaded.content_hash, layer, prefixes)) if store_dir else None
    results = store.load() if store else {}
    todo = sorted({e.content_key: e for e in edits if e.content_key not in results}.values(),
                  key=lambda e: len(e.prompt))
    bar = tqdm(total=len(todo), desc=f"z at L{layer}", unit="edit", disable=not progress)
    for start in range(0, len(todo), cfg.chunk_size):
        part = todo[start : start + cfg.chunk_size]
        chunk = _build(loaded.tokenizer, part, prefixes, cfg)
        z, loss, loss0, steps = _optimise(loaded.model, layer, chunk, len(part), cfg)
        tensors = {"z": z.detach().cpu(), "loss": loss, "loss0": loss0, "steps": steps}
        keys = [e.content_key for e in part]
        if store:
            store.add(keys, tensors)
        for i, key in enumerate(keys):
            results[key] = {name: t[i] for name, t in tensors.items()}
        bar.update(len(part))
        bar.set_postfix(loss=f"{float(loss.mean()):.3f}")
    bar.close()
    return results
