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
element by element, so each edit's trajectory equals optimising it alone). Block L's output is
computed once per chunk and only layers L+1.. run per step. Finished z are stored per edit
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
from meg.baselines import locate
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
    batch: textbatch.TargetBatch  # every row; scored positions = target tokens and essence lookups
    lookup: torch.Tensor  # (R,) column where delta is added
    edit: torch.Tensor  # (R,) edit of each row (index into the chunk)
    essence_pos: torch.Tensor  # (N,) bool: the scored position is an essence lookup (KL), not a target
    bare_row: torch.Tensor  # (E,) row of each edit's bare prompt


def _build(tok, edits: "list[EditRequest]", prefixes: list[str], cfg: TargetConfig) -> _Chunk:
    suffix_ids = tok(cfg.suffix, add_special_tokens=False).input_ids if cfg.suffix else []
    seqs, lookups, edit_of, scored, bare = [], [], [], [], []
    for i, e in enumerate(edits):
        target = tok(textbatch.target_text(e.target_new), add_special_tokens=False).input_ids + suffix_ids
        for prefix in prefixes:
            text = locate.with_prefix(prefix, e.prompt)
            p = tok(text, add_special_tokens=True).input_ids
            if not prefix:
                bare.append(len(seqs))
            lookups.append(locate.lookup_index(tok, text, e.subject, len(prefix) + 1 if prefix else 0))
            scored.append([(len(p) - 1 + j, t) for j, t in enumerate(target)])
            seqs.append((p + target)[:-1])
            edit_of.append(i)
        if e.subject and cfg.kl_factor > 0:
            text = ESSENCE.format(e.subject)
            ids = tok(text, add_special_tokens=True).input_ids
            at = locate.lookup_index(tok, text, e.subject)
            lookups.append(at)
            scored.append([(at, -1)])
            seqs.append(ids)
            edit_of.append(i)
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
        for col, label in scored[r]:
            rows.append(r)
            cols.append(col)
            labels.append(label)
    rows_t, labels_t = torch.tensor(rows), torch.tensor(labels)
    batch = textbatch.TargetBatch(ids, mask, rows_t, torch.tensor(cols), labels_t.clamp(min=0), rows_t.clone(),
                                  torch.bincount(rows_t, minlength=len(seqs)))
    return _Chunk(batch, torch.tensor(lookups), torch.tensor(edit_of), labels_t < 0, torch.tensor(bare))


def _sub(chunk: _Chunk, rows: torch.Tensor) -> tuple[textbatch.TargetBatch, torch.Tensor]:
    """The sub-batch of ``rows`` (positions renumbered) and the kept positions' mask."""
    b = chunk.batch
    keep = torch.isin(b.owner, rows)
    new_index = torch.full((b.input_ids.shape[0],), -1, dtype=torch.long)
    new_index[rows] = torch.arange(rows.numel())
    owner = new_index[b.owner[keep]]
    sub = textbatch.TargetBatch(b.input_ids[rows], b.attention_mask[rows], owner, b.cols[keep], b.labels[keep],
                                owner, b.n_target[rows])
    return sub, keep


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
    b = chunk.batch
    hidden = fit.layer_inputs(model, layer + 1, b)  # (R, T, D) output of block L
    z0 = hidden[chunk.bare_row, chunk.lookup[chunk.bare_row]]  # (E, D)
    z0_norm = z0.norm(dim=1)  # (E,)
    delta = torch.zeros_like(z0)
    state = {"m": torch.zeros_like(z0), "v": torch.zeros_like(z0), "t": torch.zeros(n_edits, dtype=torch.long)}
    done = torch.zeros(n_edits, dtype=torch.bool)
    steps = torch.zeros(n_edits, dtype=torch.long)
    final = torch.full((n_edits,), float("nan"))
    first = torch.full((n_edits,), float("nan"))
    init_lp: torch.Tensor | None = None  # (E, V) essence log-probs before editing
    holder: dict = {}
    with fit.replay_from(model, layer + 1, holder):
        for step in range(cfg.steps):
            active = (~done).nonzero().flatten()  # (A,)
            if active.numel() == 0:
                break
            rows = torch.isin(chunk.edit, active).nonzero().flatten()  # (R',)
            sub, keep = _sub(chunk, rows)
            remap = torch.full((n_edits,), -1, dtype=torch.long)
            remap[active] = torch.arange(active.numel())
            row_edit = remap[chunk.edit[rows]]  # (R',) index into active
            d = delta[active].clone().requires_grad_(True)  # (A, D)
            h = hidden[rows].clone()
            h[torch.arange(rows.numel()), chunk.lookup[rows]] += d[row_edit]
            holder["h"] = h
            logp = torch.log_softmax(textbatch.logits_at(model, sub), -1)  # (N', V)
            essence = chunk.essence_pos[keep]
            pos_edit = row_edit[sub.owner]  # (N',)
            # NLL: mean over each row's target tokens, then over the edit's rows
            tgt = ~essence
            tok_lp = logp[tgt].gather(1, sub.labels[tgt, None]).squeeze(1)
            n_rows = rows.numel()
            row_nll = -textbatch.per_row_mean(tok_lp, sub.owner[tgt], n_rows)  # (R',)
            is_target_row = torch.zeros(n_rows, dtype=torch.bool)
            is_target_row[sub.owner[tgt]] = True
            nll = torch.zeros(active.numel()).index_add(0, row_edit[is_target_row], row_nll[is_target_row])
            nll = nll / torch.bincount(row_edit[is_target_row], minlength=active.numel()).clamp(min=1)
            kl = torch.zeros(active.numel())
            if essence.any():
                cur = logp[essence]  # (K, V)
                kl_edit = pos_edit[essence]
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
        chunk.batch = chunk.batch.to(loaded.model.device)
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
