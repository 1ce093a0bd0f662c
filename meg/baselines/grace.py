"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors"): a codebook at one layer that replaces the layer's output for inputs near an edit.

Notation (paper -> code): the adaptor wraps one module of layer l (``module``: the FFN, or its
output projection). Its codebook holds entries (k_j, v_j, eps_j, y_j): a key (the wrapped module's
input at an edit prompt's last token), a value (trained so the model outputs the edit's target),
a deferral radius and the label (the target text). For an input activation h at any position,
with j the nearest key (Euclidean distance d):

    output = v_j          if d <= eps_j
             module(h)    otherwise (the model is untouched)

Edits enter the codebook one after another with the paper's rules, d and j for the edit's key:
- empty codebook, or d > eps_j + eps_init: a new entry (k, v, eps_init, y);
- d <= eps_j + eps_init and y_j != y (conflict): both radii become d / 2 (split), new entry added;
- d <= eps_j + eps_init and y_j == y: the entry absorbs the edit; when d > eps_j the radius grows to
  d ("coverage"), or the key moves halfway to the new one and the radius becomes d
  ("moving_average").
Then every entry's value is trained (Adam, per entry) on its edits' prompts, the value standing in
for the module's output at the last prompt token, on cross-entropy of target + suffix, until each
of its prompts reproduces its target greedily or ``steps`` is reached.

Every position is checked against the codebook (in generation, that is the newest token at each
step, which is GRACE's check of the last token), so teacher-forced scoring and generation agree.
Trained values are stored per run (model, edits, settings) so an interrupted run resumes. Entries
train independently, so N processes can each train and store shard I of N of them (``store_values``;
the codebook is built from every edit in each) before the run that edits finds every value stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from meg import fit, lm, textbatch
from meg.baselines import locate
from meg.baselines.targets import adam_rows
from meg.errors import ConfigError
from meg.evaluate import EditedLM, Editor

if TYPE_CHECKING:
    from meg.facts import EditRequest

MODULES = ("ffn", "out_proj")
EXPANSIONS = ("coverage", "moving_average")


@dataclass
class GraceConfig:
    layer: int | None = None  # layer whose module gets the codebook; None = the registry's default
    module: str = "ffn"  # "ffn" (key = FFN input, D) or "out_proj" (key = FFN inner activation, I)
    eps_init: float = 1.0  # radius of a new entry
    expand: str = "coverage"  # how a same-label key outside an entry's radius is absorbed
    value_init: str = "warm"  # "warm": the module's own output at the key; "cold": U[0, 1) as in the paper's code
    lr: float = 1.0  # Adam step size for the values
    steps: int = 100  # value training steps at most
    suffix: str = "\n"  # fitted after the target, as for MeG and FT
    chunk_size: int = 64  # entries trained together
    cache: bool = True  # store trained values under $MEG_HOME/baselines/grace (resume)
    progress: bool = True
    seed: int = 0  # of cold value initialisation

    def __post_init__(self) -> None:
        checks = {"module": self.module in MODULES, "eps_init": self.eps_init >= 0,
                  "expand": self.expand in EXPANSIONS, "value_init": self.value_init in ("warm", "cold"),
                  "lr": self.lr > 0, "steps": self.steps >= 1, "chunk_size": self.chunk_size >= 1,
                  "layer": self.layer is None or self.layer >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"grace: bad value for '{name}': {getattr(self, name)!r}")

    def key(self, model_hash: str, layer: int, edit_keys: list[str]) -> str:
        settings = {k: v for k, v in asdict(self).items() if k not in ("chunk_size", "cache", "progress")}
        blob = json.dumps({"model": model_hash, "layer": layer, "edits": edit_keys, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the adaptor


class Codebook(nn.Module):
    """Wraps a module; replaces its output where the input falls within a codebook entry's radius."""

    SEARCH_ROWS = 4096  # positions compared with the codebook at once (bounds the distance matrix)

    def __init__(self, base_layer: nn.Module, keys: torch.Tensor, values: torch.Tensor, eps: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.keys, self.values, self.eps = keys, values, eps  # (C, Dk), (C, Dv), (C,)
        self.forced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, cols, values)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, Dv)
        if self.forced is not None:  # value training: the given values stand in at given positions
            rows, cols, vals = self.forced
            out = out.index_put((rows, cols), vals.to(out.dtype))
            return out
        if self.keys.shape[0] == 0:
            return out
        flat_x = x.reshape(-1, x.shape[-1])  # (B*T, Dk)
        flat_out = out.reshape(-1, out.shape[-1])
        hits, picks = [], []
        for s in range(0, flat_x.shape[0], self.SEARCH_ROWS):
            dist = torch.cdist(flat_x[s : s + self.SEARCH_ROWS].float(), self.keys)  # (n, C)
            d, j = dist.min(dim=1)
            hits.append(d <= self.eps[j])
            picks.append(j)
        hit, pick = torch.cat(hits), torch.cat(picks)
        if not hit.any():
            return out
        flat_out = torch.where(hit[:, None], self.values[pick].to(out.dtype), flat_out)
        return flat_out.view_as(out)


@contextmanager
def attached_codebook(model: nn.Module, layer: int, module: str, keys: torch.Tensor, values: torch.Tensor,
                      eps: torch.Tensor) -> Iterator[Codebook]:
    """Wrap the chosen module of ``layer`` with a codebook for the duration of the block."""
    parent, name = _parent(model, layer, module)
    base = getattr(parent, name)
    if isinstance(base, Codebook):
        raise RuntimeError(f"layer {layer} already carries a GRACE codebook")
    book = Codebook(base, keys, values, eps)
    setattr(parent, name, book)
    try:
        yield book
    finally:
        setattr(parent, name, base)


def _parent(model: nn.Module, layer: int, module: str) -> tuple[nn.Module, str]:
    spec = lm.arch_of(model)
    if module == "ffn":
        return lm.decoder_layers(model)[layer], spec.ffn_name
    return lm.ffn_module(model, layer), spec.out_proj


# ------------------------------------------------------------------------------ building the codebook


@dataclass
class Book:
    keys: torch.Tensor  # (C, Dk)
    eps: torch.Tensor  # (C,)
    labels: list[str]
    entry_of_edit: list[int]  # (N,) entry each edit trains
    n_split: int = 0
    n_expanded: int = 0


def build_codebook(keys: torch.Tensor, labels: list[str], eps_init: float, expand: str) -> Book:
    """Apply GRACE's insertion rules to the edits' keys (N, Dk) in order."""
    n, dk = keys.shape
    book_keys = torch.empty(n, dk)
    eps = torch.empty(n)
    book_labels: list[str] = []
    entry_of: list[int] = []
    size, n_split, n_expanded = 0, 0, 0
    for i in range(n):
        k = keys[i]
        if size:
            dist = (book_keys[:size] - k).norm(dim=1)
            d, j = (float(x) for x in dist.min(0))
            j = int(j)
        if size == 0 or d > float(eps[j]) + eps_init:
            book_keys[size], eps[size] = k, eps_init
            book_labels.append(labels[i])
            entry_of.append(size)
            size += 1
        elif book_labels[j] != labels[i]:  # conflict: split the radii at half the distance
            eps[j] = d / 2 - 1e-5
            book_keys[size], eps[size] = k, d / 2
            book_labels.append(labels[i])
            entry_of.append(size)
            size += 1
            n_split += 1
        else:
            if d > float(eps[j]):
                if expand == "moving_average":
                    book_keys[j] = 0.5 * book_keys[j] + 0.5 * k
                eps[j] = d
                n_expanded += 1
            entry_of.append(j)
    return Book(book_keys[:size].clone(), eps[:size].clone(), book_labels, entry_of, n_split, n_expanded)


# ------------------------------------------------------------------------------ the editor


def _module_fn(model: nn.Module, layer: int, module: str) -> nn.Module:
    parent, name = _parent(model, layer, module)
    return getattr(parent, name)


def _train_values(loaded, edits, book: Book, layer: int, cfg: GraceConfig, values: torch.Tensor,
                  store: fit.WeightStore | None, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Train each entry's value on its edits' prompts; returns values (C, Dv) and success (C,).

    With ``shard`` (i, n), only the entries j with j % n == i that the store lacks are trained.
    """
    model, tok = loaded.model, loaded.tokenizer
    members: dict[int, list[int]] = {}
    for i, j in enumerate(book.entry_of_edit):
        members.setdefault(j, []).append(i)
    known = store.load() if store else {}
    success = torch.zeros(len(book.labels), dtype=torch.bool)
    for j, found in ((int(k.split("-")[1]), v) for k, v in known.items()):
        values[j], success[j] = found["value"], found["success"]
    todo = [j for j in range(len(book.labels)) if f"entry-{j}" not in known and j % shard[1] == shard[0]]
    bar = tqdm(total=len(todo), desc=f"grace values L{layer}", unit="entry", disable=not cfg.progress)
    parent, name = _parent(model, layer, cfg.module)
    for s in range(0, len(todo), cfg.chunk_size):
        chunk = todo[s : s + cfg.chunk_size]
        rows = [(c, i) for c, j in enumerate(chunk) for i in members[j]]
        batch = textbatch.encode(tok, [edits[i].prompt for _, i in rows], [edits[i].target_new for _, i in rows],
                                 cfg.suffix).to(model.device)
        entry_of_row = torch.tensor([c for c, _ in rows])
        key_cols = torch.tensor([len(tok(edits[i].prompt, add_special_tokens=True).input_ids) - 1 for _, i in rows])
        v, ok = _fit_chunk(model, parent, name, layer, batch, entry_of_row, key_cols, values[chunk].clone(), cfg)
        values[chunk], success[chunk] = v, ok
        if store:
            store.add([f"entry-{j}" for j in chunk], {"value": v, "success": ok})
        bar.update(len(chunk))
    bar.close()
    return values, success


def _fit_chunk(model, parent, name, layer, batch, entry_of_row, key_cols, v0, cfg):
    n = v0.shape[0]
    hidden = fit.layer_inputs(model, layer, batch)  # (R, T, D) input of block l
    vals = v0.clone()
    state = {"m": torch.zeros_like(vals), "v": torch.zeros_like(vals), "t": torch.zeros(n, dtype=torch.long)}
    done = torch.zeros(n, dtype=torch.bool)
    success = torch.zeros(n, dtype=torch.bool)
    holder = {"h": hidden}
    book = Codebook(getattr(parent, name), torch.empty(0, 1), torch.empty(0, 1), torch.empty(0))
    setattr(parent, name, book)
    rows_all = torch.arange(batch.input_ids.shape[0])
    try:
        with fit.replay_from(model, layer, holder):
            for step in range(cfg.steps + 1):
                v = vals.clone().requires_grad_(True)
                book.forced = (rows_all, key_cols, v[entry_of_row])
                logits = textbatch.logits_at(model, batch)
                ce = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="none")
                row_loss = textbatch.per_row_mean(ce, batch.owner, rows_all.numel())
                correct = textbatch.per_row_all(logits.argmax(-1) == batch.labels, batch.owner, rows_all.numel())
                entry_ok = torch.zeros(n, dtype=torch.long).index_add(0, entry_of_row, (~correct).long()) == 0
                success |= entry_ok & ~done
                done |= entry_ok
                if done.all() or step == cfg.steps:
                    break
                train_rows = ~done[entry_of_row]
                row_loss[train_rows].sum().backward()
                idx = (~done).nonzero().flatten()
                with torch.no_grad():
                    adam_rows(vals, v.grad[idx], state, cfg.lr, idx)
    finally:
        setattr(parent, name, book.base_layer)
    return vals.detach(), success


class Grace(Editor):
    name = "grace"
    label = "GRACE"

    def __init__(self, cfg: GraceConfig | None = None):
        self.cfg = cfg

    def config_for(self, loaded: lm.LoadedModel) -> GraceConfig:
        from meg.baselines.registry import config_for

        return self.cfg if self.cfg is not None else config_for(self.name, loaded)

    def _prepare(self, loaded: lm.LoadedModel, edits: "list[EditRequest]"):
        """The settings, layer, codebook, initial values and value store of editing with ``edits``."""
        cfg = self.config_for(loaded)
        model = loaded.model
        layer = cfg.layer if cfg.layer is not None else loaded.default_layer
        if not 0 <= layer < lm.num_layers(model):
            raise ConfigError(f"grace: bad value for 'layer': {layer} (the model has {lm.num_layers(model)} layers)")
        kind = "ffn_in" if cfg.module == "ffn" else "key"
        keys = _last_token_acts(loaded, edits, kind, layer, cfg.progress)  # (N, Dk)
        book = build_codebook(keys, [e.target_new.strip() for e in edits], cfg.eps_init, cfg.expand)
        module = _module_fn(model, layer, cfg.module)
        with torch.no_grad():
            if cfg.value_init == "warm":  # the wrapped modules act position by position
                values = module(book.keys[:, None, :].to(model.device)).squeeze(1).float().cpu()
            else:
                g = torch.Generator().manual_seed(cfg.seed)
                width = module(book.keys[:1, None, :].to(model.device)).shape[-1]
                values = torch.rand(len(book.labels), width, generator=g)
        store = None
        if cfg.cache:
            store = fit.WeightStore(lm.meg_home() / "baselines" / "grace"
                                    / cfg.key(loaded.content_hash, layer, [e.content_key for e in edits]))
        return cfg, layer, book, values, store

    def store_values(self, loaded: lm.LoadedModel, edits: "list[EditRequest]", shard: tuple[int, int]) -> int:
        """Train and store the values of shard (i, n) of the codebook's entries (entry j when j % n == i)
        exactly as ``apply`` with all of ``edits`` would, without editing; returns how many of the
        shard's entries are stored. N processes with shards 0..N-1 fill the store on N cores."""
        edits = list(edits)
        cfg, layer, book, values, store = self._prepare(loaded, edits)
        if store is None:
            raise ConfigError("grace: storing values needs 'cache' on (the store is where they go)")
        _train_values(loaded, edits, book, layer, cfg, values, store, shard)
        return sum(1 for key in store.load() if int(key.split("-")[1]) % shard[1] == shard[0])

    def tuning_texts(self) -> list[str]:
        from meg.baselines.registry import tuning_texts

        loaded = getattr(self, "_loaded", None)  # the model of the last apply
        return tuning_texts(self.name, loaded) if loaded is not None and self.cfg is None else []

    def apply(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> EditedLM:
        self._loaded = loaded
        t0 = time.time()
        edits = list(edits)
        model = loaded.model
        cfg, layer, book, values, store = self._prepare(loaded, edits)
        values, ok = _train_values(loaded, edits, book, layer, cfg, values, store)
        ctx = attached_codebook(model, layer, cfg.module, book.keys.to(model.device), values.to(model.device),
                                book.eps.to(model.device))
        ctx.__enter__()

        def restore() -> None:
            ctx.__exit__(None, None, None)

        edited = EditedLM(loaded, restore=restore)
        edited.extra_metrics = {"layer": layer, "entries": len(book.labels), "splits": book.n_split,
                                "expanded": book.n_expanded, "value_success": float(ok.float().mean()) if len(ok) else 0.0,
                                "seconds": time.time() - t0}
        return edited


@torch.no_grad()
def _last_token_acts(loaded, edits, kind: str, layer: int, progress: bool) -> torch.Tensor:
    from meg.baselines.keys import ROWS_PER_BATCH

    tok, model = loaded.tokenizer, loaded.model
    order = sorted(range(len(edits)), key=lambda i: len(edits[i].prompt))
    out: torch.Tensor | None = None
    for s in tqdm(range(0, len(order), ROWS_PER_BATCH), desc=f"grace keys L{layer}", unit="batch",
                  disable=not progress, leave=False):
        idx = order[s : s + ROWS_PER_BATCH]
        rows = locate.encode_rows(tok, [edits[i].prompt for i in idx], [None] * len(idx))
        acts = locate.capture(model, rows.input_ids.to(model.device), rows.attention_mask.to(model.device),
                              [(kind, layer)])[(kind, layer)]
        vals = locate.at_lookup(acts, rows.lookup.to(model.device)).float().cpu()
        if out is None:
            out = torch.empty(len(edits), vals.shape[1])
        out[idx] = vals
    return out
