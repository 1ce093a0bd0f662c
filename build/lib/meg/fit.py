"""Per-edit fitting: one neuron per edit, many edits at once, from one shared initialisation w0.

For every edit the base model stays frozen, the dynamic neuron of ``meg.neuron`` is attached to
layer L, and its packed weights w = [k, v, b] are optimised on cross-entropy over the target tokens
of the edit prompt (prompt tokens are not scored). Edits are fitted together but independently: the
loss is a sum of per-edit losses and the optimiser acts element by element, so each edit's
trajectory equals fitting it alone.

Speed on a CPU comes from three things:
- the residual stream entering layer L is computed once per edit (no grad) and replayed, so each
  step runs only layers L..N-1;
- logits are computed only at the target positions;
- an edit leaves the batch as soon as it succeeds (greedy decoding reproduces its target and the
  suffix that ends the answer), so late steps run on the few slow edits only.

Results are stored per edit in a directory of safetensors parts keyed by the edit's content key
(prompt and target). Fitting again with the same model and settings reuses every stored edit:
an interrupted run resumes, and newly added facts are the only ones fitted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from meg import lm, neuron, textbatch
from meg.errors import ConfigError
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meg.augment import TemplateBank
    from meg.facts import EditRequest


@dataclass
class FitConfig:
    layer: int | None = None  # layer whose FFN gets the neuron; None = the model's registered default
    act: str = "identity"  # neuron activation: "identity" (bilinear neuron) or "ffn" (the FFN's own)
    optimizer: str = "sgd"  # "sgd" (transfers better to paraphrases) or "adam" (fewer steps)
    lr: float = 2.0  # step size; SGD needs a large one because the initial neuron is near zero
    max_steps: int = 60  # cap on optimisation steps per edit
    stop: str = "success"  # "success": stop at the first greedy success; "margin": also need CE < margin_ce
    margin_ce: float = 0.05  # per-token cross-entropy below which a "margin" edit is done
    l2: float = 0.0  # penalty on ||w - w0||^2, keeps deltas small and the generator's targets tame
    suffix: str = "\n"  # fitted after the target so generated answers end there
    n_variants: int = 0  # rewordings of each prompt from the pseudo-edit template bank (meg.augment), 0 = off
    n_prefixes: int = 0  # random context prefixes per edit (robustness to preceding text), 0 = off
    prefix_tokens: int = 8  # length of each generated prefix
    chunk_size: int = 32  # edits per batch (rows = chunk_size * (1 + n_prefixes))
    seed: int = 0  # seed of the shared initialisation w0 and of the prefixes
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "act": self.act in neuron.ACTIVATIONS,
            "optimizer": self.optimizer in ("sgd", "adam"),
            "lr": self.lr > 0,
            "max_steps": self.max_steps >= 1,
            "stop": self.stop in ("success", "margin"),
            "margin_ce": self.margin_ce > 0,
            "l2": self.l2 >= 0,
            "n_variants": self.n_variants >= 0,
            "n_prefixes": self.n_prefixes >= 0,
            "prefix_tokens": self.prefix_tokens >= 1,
            "chunk_size": self.chunk_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"fit: bad value for '{name}': {getattr(self, name)!r}")

    def key(self, model_hash: str, layer: int) -> str:
        """Identifies fitted weights: same model, layer and settings -> reusable."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("chunk_size", "device", "layer")}
        blob = json.dumps({"model": model_hash, "layer": layer, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FitResult:
    ids: list[str]  # edit ids, in the order of the input edits
    keys: list[str]  # content keys
    weights: torch.Tensor  # (N, 2D+1) fitted neuron weights
    w0: torch.Tensor  # (2D+1,) the shared initialisation
    success: torch.Tensor  # (N,) bool: greedy decoding reproduces the target (+ suffix)
    steps: torch.Tensor  # (N,) optimisation steps taken
    loss: torch.Tensor  # (N,) final mean cross-entropy per target token
    layer: int
    seconds: float

    def report(self) -> dict:
        n = len(self.ids)
        delta = (self.weights - self.w0).norm(dim=1)
        failed = [i for i, ok in zip(self.ids, self.success.tolist()) if not ok]
        return {
            "n_edits": n,
            "n_success": int(self.success.sum()),
            "success_rate": float(self.success.float().mean()) if n else 0.0,
            "steps_median": float(self.steps.float().median()) if n else 0.0,
            "steps_max": int(self.steps.max()) if n else 0,
            "delta_norm_mean": float(delta.mean()) if n else 0.0,
            "layer": self.layer,
            "seconds": self.seconds,
            "failed_ids": failed,
        }


class _Skip(nn.Module):
    """Stands in for a decoder layer below L while cached states are replayed."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextmanager
def replay_from(model: nn.Module, layer: int, holder: dict) -> Iterator[None]:
    """Run the model from layer ``layer`` on, feeding it ``holder["h"]`` as that layer's input."""
    layers = lm.decoder_layers(model)
    originals = [layers[i] for i in range(layer)]

    def feed(module, args, kwargs):
        if args:
            return (holder["h"],) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": holder["h"]}

    handle = layers[layer].register_forward_pre_hook(feed, with_kwargs=True)
    for i in range(layer):
        layers[i] = _Skip()
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(originals):
            layers[i] = original


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: int, batch: textbatch.TargetBatch) -> torch.Tensor:
    """The residual stream entering ``layer`` for a batch, (B, T, D)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    layers = lm.decoder_layers(model)
    handle = layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base_model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=textbatch.position_ids(batch.attention_mask),
            use_cache=False,
        )
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


class _Stop(Exception):
    pass


@torch.no_grad()
def context_prefixes(loaded: lm.LoadedModel, n: int, n_tokens: int, seed: int) -> list[str]:
    """Short texts the base model writes itself, to put before prompts while fitting."""
    if n == 0:
        return []
    tok, model = loaded.tokenizer, loaded.model
    starts = ["The", "Therefore", "Because", "I", "You", "It", "In", "When", "She", "We"]
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        ids = tok(starts[i % len(starts)], return_tensors="pt").input_ids
        for _ in range(n_tokens):
            logits = model(input_ids=ids).logits[0, -1]
            top = torch.topk(logits, 5)
            pick = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)]
            ids = torch.cat([ids, pick.view(1, 1)], dim=1)
        text = tok.decode(ids[0], skip_special_tokens=True).replace("\n", " ").strip()
        texts.append(text.rstrip(".") + ".")
    return texts


class WeightStore:
    """Fitted weights per content key, as a directory of safetensors parts (written atomically)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        found: dict[str, dict[str, torch.Tensor]] = {}
        for part in sorted(self.root.glob("part-*.safetensors")):
            meta_path = part.with_suffix(".json")
            if not meta_path.is_file():
                continue  # a part without its index was interrupted before completion
            keys = json.loads(meta_path.read_text())["keys"]
            tensors = load_file(part)
            for i, key in enumerate(keys):
                found[key] = {name: t[i] for name, t in tensors.items()}
        return found

    def add(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        part = self.root / f"part-{name}.safetensors"
        tmp = part.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, part)
        meta_tmp = part.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps({"keys": keys}))
        os.replace(meta_tmp, part.with_suffix(".json"))


def _adam_step(w, grad, state, lr, rows, b1=0.9, b2=0.999, eps=1e-8):
    m, v, t = state["m"], state["v"], state["t"]
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad * grad
    t[rows] += 1
    tt = t[rows].unsqueeze(1).float()
    mhat = m[rows] / (1 - b1**tt)
    vhat = v[rows] / (1 - b2**tt)
    w[rows] -= lr * mhat / (vhat.sqrt() + eps)


def _fit_chunk(model, neuron_mod, layer, batch, edit_of_row, n_edits, w0, cfg):
    """Optimise one chunk of edits; returns weights, success, steps and loss per edit."""
    hidden = layer_inputs(model, layer, batch)  # (R, T, D)
    w = w0.expand(n_edits, -1).clone()  # (E, P)
    state = {"m": torch.zeros_like(w), "v": torch.zeros_like(w), "t": torch.zeros(n_edits, dtype=torch.long)}
    done = torch.zeros(n_edits, dtype=torch.bool)
    success = torch.zeros(n_edits, dtype=torch.bool)
    steps = torch.zeros(n_edits, dtype=torch.long)
    loss_out = torch.full((n_edits,), float("nan"))
    holder: dict = {}
    with replay_from(model, layer, holder):
        for step in range(cfg.max_steps + 1):
            active = (~done).nonzero().flatten()  # (A,) edits still training
            if active.numel() == 0:
                break
            row_sel = torch.isin(edit_of_row, active).nonzero().flatten()
            sub = _select_rows(batch, row_sel)
            holder["h"] = hidden.index_select(0, row_sel)
            remap = torch.full((n_edits,), -1, dtype=torch.long)
            remap[active] = torch.arange(active.numel())
            row_edit = remap[edit_of_row[row_sel]]  # (R',) index into active
            w_act = w[active].clone().requires_grad_(True)
            neuron_mod.set_weights(w_act[row_edit], active=torch.ones(row_sel.numel(), dtype=torch.bool))
            logits = textbatch.logits_at(model, sub)
            ce = torch.nn.functional.cross_entropy(logits, sub.labels, reduction="none")
            row_loss = textbatch.per_row_mean(ce, sub.owner, row_sel.numel())
            edit_loss = torch.zeros(active.numel()).index_add(0, row_edit, row_loss)
            edit_loss = edit_loss / torch.bincount(row_edit, minlength=active.numel()).clamp(min=1)
            correct = logits.argmax(-1) == sub.labels
            row_ok = textbatch.per_row_all(correct, sub.owner, row_sel.numel())
            edit_ok = torch.zeros(active.numel(), dtype=torch.long).index_add(0, row_edit, (~row_ok).long()) == 0
            finished = edit_ok if cfg.stop == "success" else edit_ok & (edit_loss.detach() < cfg.margin_ce)
            loss_out[active] = edit_loss.detach()
            success[active] = edit_ok
            if step == cfg.max_steps:
                break
            finished_edits = active[finished]
            done[finished_edits] = True
            train = ~finished
            if not train.any():
                break
            total = edit_loss[train].sum()
            if cfg.l2:
                total = total + cfg.l2 * ((w_act[train] - w0) ** 2).sum()
            total.backward()
            grad = w_act.grad[train]
            rows = active[train]
            with torch.no_grad():
                if cfg.optimizer == "adam":
                    _adam_step(w, grad, state, cfg.lr, rows)
                else:
                    w[rows] -= cfg.lr * grad
            steps[rows] += 1
    neuron_mod.clear()
    return w, success, steps, loss_out


def _select_rows(batch: textbatch.TargetBatch, rows: torch.Tensor) -> textbatch.TargetBatch:
    """The sub-batch of the given rows, with scored positions renumbered."""
    keep = torch.isin(batch.owner, rows)
    new_index = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long)
    new_index[rows] = torch.arange(rows.numel())
    owner = new_index[batch.owner[keep]]
    return textbatch.TargetBatch(
        input_ids=batch.input_ids.index_select(0, rows),
        attention_mask=batch.attention_mask.index_select(0, rows),
        rows=owner,
        cols=batch.cols[keep],
        labels=batch.labels[keep],
        owner=owner,
        n_target=batch.n_target.index_select(0, rows),
    )


def fit_edits(
    loaded: lm.LoadedModel,
    edits: "list[EditRequest]",
    cfg: FitConfig,
    store_dir: Path | None = None,
    progress: bool = True,
    bank: "TemplateBank | None" = None,
) -> FitResult:
    """Fit one neuron per edit. With ``store_dir``, stored edits are reused and new ones stored.

    ``bank`` supplies rewordings of each prompt (``cfg.n_variants`` of them) fitted alongside it;
    without one, ``n_variants`` must be 0.
    """
    if cfg.n_variants and bank is None:
        raise ConfigError("fit: 'n_variants' > 0 needs a template bank (meg.augment.TemplateBank)")
    t0 = time.time()
    model, tok = loaded.model, loaded.tokenizer
    layer = cfg.layer if cfg.layer is not None else loaded.default_layer
    d = lm.hidden_size(model)
    inter = getattr(model.config, "intermediate_size", None) or getattr(model.config, "n_inner", None)
    w0 = neuron.shared_init(d, inter, seed=cfg.seed)
    store = WeightStore(Path(store_dir) / cfg.key(loaded.content_hash, layer)) if store_dir else None
    known = store.load() if store else {}
    keys = [e.content_key for e in edits]
    todo = sorted({k: e for k, e in zip(keys, edits) if k not in known}.values(), key=lambda e: len(e.prompt))
    prefixes = context_prefixes(loaded, cfg.n_prefixes, cfg.prefix_tokens, cfg.seed)
    results: dict[str, dict[str, torch.Tensor]] = dict(known)
    bar = tqdm(total=len(todo), desc=f"fit L{layer}", unit="edit", disable=not progress)
    with neuron.attached_neuron(model, layer, cfg.act) as neuron_mod:
        for start in range(0, len(todo), cfg.chunk_size):
            chunk = todo[start : start + cfg.chunk_size]
            prompts, targets, edit_of_row = [], [], []
            for i, e in enumerate(chunk):
                rewordings = bank.variants(e.prompt, e.subject, cfg.n_variants) if bank else []
                for text in [e.prompt] + rewordings + [f"{p} {e.prompt}" for p in prefixes]:
                    prompts.append(text)
                    targets.append(e.target_new)
                    edit_of_row.append(i)
            batch = textbatch.encode(tok, prompts, targets, cfg.suffix).to(cfg.device)
            w, ok, steps, loss = _fit_chunk(
                model, neuron_mod, layer, batch, torch.tensor(edit_of_row), len(chunk), w0.to(cfg.device), cfg
            )
            tensors = {"w": w.detach().cpu(), "success": ok, "steps": steps, "loss": loss}
            chunk_keys = [e.content_key for e in chunk]
            if store:
                store.add(chunk_keys, tensors)
            for i, key in enumerate(chunk_keys):
                results[key] = {name: t[i] for name, t in tensors.items()}
            bar.update(len(chunk))
            bar.set_postfix(ok=f"{sum(int(results[k]['success']) for k in chunk_keys)}/{len(chunk)}")
    bar.close()
    return FitResult(
        ids=[e.id for e in edits],
        keys=keys,
        weights=torch.stack([results[k]["w"] for k in keys]) if keys else torch.empty(0, w0.numel()),
        w0=w0,
        success=torch.stack([results[k]["success"] for k in keys]) if keys else torch.empty(0, dtype=torch.bool),
        steps=torch.stack([results[k]["steps"] for k in keys]) if keys else torch.empty(0, dtype=torch.long),
        loss=torch.stack([results[k]["loss"] for k in keys]) if keys else torch.empty(0),
        layer=layer,
        seconds=time.time() - t0,
    )
