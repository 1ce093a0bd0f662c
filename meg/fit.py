"""Per-edit fitting: one neuron per edit, many edits at once, from one shared initialisation w0.

For every edit the base model stays frozen, the dynamic neuron of ``meg.neuron`` is attached to
layer L, and its packed weights w = [k, v, b] are optimised on cross-entropy over the target tokens
of the edit prompt (prompt tokens are not scored). Edits are fitted together but independently: the
loss is a sum of per-edit losses and the optimiser acts element by element, so each edit's
trajectory equals fitting it alone.

Speed on a CPU comes from three things:
- the FFN input x and the output of layer L are computed once per edit (no grad); the neuron
  changes that output by exactly v * act(k . x + b), so each step runs only layers L+1..N-1;
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
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from meg import lm, neuron, textbatch
from meg.hashing import file_sha256
from meg.errors import ConfigError
from meg.facts import normalise_prompt
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meg.augment import TemplateBank
    from meg.facts import EditRequest


@dataclass
class FitConfig:
    layer: int | None = None  # layer whose FFN gets the neuron; None = the model's registered default
    act: str = "identity"  # neuron activation: "identity" (bilinear neuron) or "ffn" (the FFN's own)
    # "nesterov" (SGD with Nesterov momentum), "sgd" or "adam" (fewer steps, transfers worse to paraphrases).
    # Measured on 64 CounterFact train pseudo-edits at layer 28 with 4 rewordings: nesterov lr 1.0 reached
    # the paraphrase in 98% (median 18 steps), plain SGD lr 2.0 in 94% (26 steps), Adam lr 0.1 in 84%.
    optimizer: str = "nesterov"
    momentum: float = 0.9  # momentum of "nesterov"
    lr: float = 1.0  # step size; SGD-type steps must be large because the initial neuron is near zero
    max_steps: int = 60  # cap on optimisation steps per edit
    stop: str = "success"  # "success": stop at the first greedy success; "margin": also need CE < margin_ce
    margin_ce: float = 0.05  # per-token cross-entropy below which a "margin" edit is done
    l2: float = 0.0  # penalty on ||w - w0||^2, keeps deltas small and the generator's targets tame
    suffix: str = "\n"  # fitted after the target so generated answers end there
    n_variants: int = 0  # rewordings of each prompt from the pseudo-edit template bank (meg.augment), 0 = off
    min_variant_share: float = 1.0  # an edit is done once its prompt and this share of its other rows succeed
    n_contexts: int = 0  # questions on the edit's subject from other relations, fitted to the target too, 0 = off
    # with n_variants > 0, an edit the template bank has no rewording for (a relation it does not know, no
    # linked same-subject edit) gets this many other-relation questions on its subject instead; 0 = off. On held-out
    # pseudo-edits fitted without rewordings, 4 such questions lift transfer to the paraphrase from 31% to 84%
    context_fallback: int = 0
    # questions on the edit's subject from other relations whose base-model answer (its first token) the
    # neuron must keep: rows scored towards that token, counted like rewordings for success; 0 = off. An
    # edit fitted on other-relation questions (n_contexts, context_fallback) gets none
    n_keep: int = 0
    # rewordings learned from the edit set: templates of same-subject edits with at least this cosine under
    # the base sentence encoder are linked (meg.augment.TemplateBank.link_same_subject); 0 = off
    edit_templates: float = 0.5
    n_prefixes: int = 0  # random context prefixes per edit (robustness to preceding text), 0 = off
    # the first this many of the edit's texts (its prompt, then rewordings) are also fitted as user turns of the
    # chat template, answered by the target and the end of the turn (chat use, meg.generation); 0 = off
    chat_contexts: int = 0
    prefix_tokens: int = 8  # length of each generated prefix
    chunk_size: int = 32  # edits per batch (rows = chunk_size * (1 + n_variants + n_contexts + n_prefixes))
    # precision of the frozen model while fitting: "bfloat16" runs it about 3x faster on CPUs with bf16
    # units; each edit is then checked (and if need be finished) in the model's own precision
    dtype: str = "float32"
    fixup_steps: int = 20  # cap on the steps that finish, in full precision, an edit a bfloat16 fit left short
    # cap on the steps that continue, on its prompt alone, an edit whose fit ended without reproducing the target
    # (its rewordings or other-relation questions held it back); 0 = off. Applied to stored fits as well, so it
    # leaves the fit store's key unchanged
    finish_steps: int = 20
    # candidate vocabulary: 0 = the cross-entropy over the whole vocabulary at every step; k > 0 = over the
    # tokens in the top k of some target position at the last whole-vocabulary step (plus the targets), the
    # whole vocabulary every head_refresh-th step and before an edit is declared done
    head_candidates: int = 0
    head_refresh: int = 5
    seed: int = 0  # seed of the shared initialisation w0 and of the prefixes
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "act": self.act in neuron.ACTIVATIONS,
            "optimizer": self.optimizer in ("sgd", "nesterov", "adam"),
            "momentum": 0 <= self.momentum < 1,
            "lr": self.lr > 0,
            "max_steps": self.max_steps >= 1,
            "stop": self.stop in ("success", "margin"),
            "margin_ce": self.margin_ce > 0,
            "l2": self.l2 >= 0,
            "n_variants": self.n_variants >= 0,
            "min_variant_share": 0 <= self.min_variant_share <= 1,
            "n_prefixes": self.n_prefixes >= 0,
            "chat_contexts": self.chat_contexts >= 0,
            "n_contexts": self.n_contexts >= 0,
            "context_fallback": self.context_fallback >= 0,
            "n_keep": self.n_keep >= 0,
            "edit_templates": 0 <= self.edit_templates <= 1,
            "prefix_tokens": self.prefix_tokens >= 1,
            "chunk_size": self.chunk_size >= 1,
            "dtype": self.dtype in ("float32", "bfloat16"),
            "fixup_steps": self.fixup_steps >= 0,
            "finish_steps": self.finish_steps >= 0,
            "head_candidates": self.head_candidates >= 0,
            "head_refresh": self.head_refresh >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"fit: bad value for '{name}': {getattr(self, name)!r}")

    @property
    def uses_bank(self) -> bool:
        """Whether fitting reads the template bank (rewordings or other-relation questions)."""
        return bool(self.n_variants or self.n_contexts or self.n_keep)  # context_fallback acts only with n_variants

    def key(self, model_hash: str, layer: int) -> str:
        """Identifies fitted weights: same model, layer and settings -> reusable."""
        skip = ("chunk_size", "device", "layer", "finish_steps")  # finish_steps acts after the store
        settings = {k: v for k, v in asdict(self).items() if k not in skip}
        if not (self.context_fallback and self.n_variants):  # inactive: the key of weights fitted before it existed
            settings.pop("context_fallback")
        if not self.n_keep:  # off: the key of weights fitted before it existed
            settings.pop("n_keep")
        if not self.chat_contexts:  # off: the key of weights fitted before it existed
            settings.pop("chat_contexts")
        if not self.head_candidates:  # whole-vocabulary fits keep the key they had before the option existed
            settings.pop("head_candidates")
            settings.pop("head_refresh")
        blob = json.dumps({"model": model_hash, "layer": layer, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FitResult:
    ids: list[str]  # edit ids, in the order of the input edits
    keys: list[str]  # content keys
    weights: torch.Tensor  # (N, 2D+1) fitted neuron weights
    w0: torch.Tensor  # (2D+1,) the shared initialisation
    success: torch.Tensor  # (N,) bool: greedy decoding of the edit prompt reproduces the target (+ suffix)
    steps: torch.Tensor  # (N,) optimisation steps taken
    loss: torch.Tensor  # (N,) final mean cross-entropy per target token
    layer: int
    seconds: float
    n_finished: int = 0  # failed fits that the finishing pass on the prompt alone made succeed
    # per content key, every text the edit's neuron was fitted on (its prompt first; kept questions last)
    contexts: dict[str, list[str]] = field(default_factory=dict)

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
            "n_finished": self.n_finished,
            "failed_ids": failed,
        }


class _Skip(nn.Module):
    """Stands in for a decoder layer below the replayed ones; the last of them emits the cached state."""

    def __init__(self, holder: dict | None = None):
        super().__init__()
        self.holder = holder

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.holder["h"] if self.holder is not None else hidden_states


@contextmanager
def replay_from(model: nn.Module, start: int, holder: dict) -> Iterator[None]:
    """Run only layers ``start``..N-1, with ``holder["h"]`` as the residual stream entering layer ``start``.

    Layers below ``start`` are swapped for stand-ins (the last one emits ``holder["h"]``) and put
    back on exit. ``start`` may be N: then only the final norm and the LM head run.
    """
    layers = lm.decoder_layers(model)
    if not 1 <= start <= len(layers):
        raise ValueError(f"replay_from: start must be in 1..{len(layers)}, got {start}")
    originals = [layers[i] for i in range(start)]
    for i in range(start):
        layers[i] = _Skip(holder if i == start - 1 else None)
    try:
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


@contextmanager
def last_ffn_at(model: nn.Module, holder: dict) -> Iterator[None]:
    """Run the FFN of the last layer only at the positions ``holder["rows"], holder["cols"]``.

    Only the scored positions of the last layer's output reach the loss, and an FFN acts on each
    position alone, so elsewhere its output is left at zero: the logits at the scored positions are
    unchanged while the last FFN, most of that layer's cost, runs on a few positions per row.
    Without ``"rows"`` in ``holder`` the FFN runs everywhere.
    """
    ffn = lm.ffn_module(model, len(lm.decoder_layers(model)) - 1)
    shape: dict = {}

    def gather(module, args, kwargs):
        if "rows" not in holder:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        shape["x"] = x.shape
        picked = x[holder["rows"], holder["cols"]].unsqueeze(0)  # (1, N, D)
        return ((picked,), {}) if args else ((), {next(iter(kwargs)): picked})

    def scatter(module, args, kwargs, output):
        if "rows" not in holder:
            return None
        out = output[0] if isinstance(output, tuple) else output
        full = out.new_zeros(shape["x"][:-1] + out.shape[-1:]).index_put((holder["rows"], holder["cols"]), out[0])
        return (full, *output[1:]) if isinstance(output, tuple) else full

    h1 = ffn.register_forward_pre_hook(gather, with_kwargs=True)
    h2 = ffn.register_forward_hook(scatter, with_kwargs=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def _run_base(model: nn.Module, batch: textbatch.TargetBatch) -> None:
    model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=textbatch.position_ids(batch.attention_mask),
        use_cache=False,
    )


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: int, batch: textbatch.TargetBatch) -> torch.Tensor:
    """The residual stream entering ``layer`` for a batch, (B, T, D)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = lm.decoder_layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run_base(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


@torch.no_grad()
def layer_states(
    model: nn.Module, layer: int, batch: textbatch.TargetBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FFN input, FFN output, layer output) at ``layer``, each (B, T, D), from one partial forward pass.

    The neuron's input x does not depend on the neuron, and the neuron only adds
    v * act(k . x + b) to the FFN output; ``with_ffn_delta`` turns that into the new layer output,
    so fitting needs to run only the layers above ``layer``.
    """
    captured = {}

    def grab_ffn(module, args, kwargs, output):
        captured["x"] = (args[0] if args else next(iter(kwargs.values()))).detach()
        captured["f"] = output.detach()

    def grab_out(module, args, kwargs, output):
        captured["h"] = (output[0] if isinstance(output, tuple) else output).detach()
        raise _Stop

    h1 = lm.ffn_module(model, layer).register_forward_hook(grab_ffn, with_kwargs=True)
    h2 = lm.decoder_layers(model)[layer].register_forward_hook(grab_out, with_kwargs=True)
    try:
        _run_base(model, batch)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    return captured["x"], captured["f"], captured["h"]


def layer_states_by_length(model: nn.Module, layer: int, batch: textbatch.TargetBatch,
                           group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_states`` in float32, computed ``group`` rows at a time in order of length so that short rows
    are not padded to the longest row of the batch; zeros at padded positions."""
    lengths = batch.attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    r, t = batch.input_ids.shape
    out = None
    for start in range(0, r, group):
        rows = order[start : start + group]
        width = int(lengths[rows].max())
        part = textbatch.TargetBatch(batch.input_ids[rows, :width], batch.attention_mask[rows, :width],
                                     *(torch.empty(0, dtype=torch.long) for _ in range(4)), batch.n_target[rows])
        states = layer_states(model, layer, part)
        if out is None:
            out = [states[0].new_zeros((r, t, s.shape[-1]), dtype=torch.float32) for s in states]
        for o, s in zip(out, states):
            o[rows, :width] = s.float()
    return tuple(out)


def ffn_delta_fn(model: nn.Module, layer: int):
    """A function (ffn_out, layer_out, delta) -> the layer's output had its FFN output been ffn_out + delta.

    Most families add the FFN output straight to the residual stream, so the delta adds through;
    Gemma-3 normalises the FFN output first, so the residual is recovered and the norm re-applied.
    The modules are looked up now, so the function also works while lower layers are swapped out.
    """
    norm = lm.post_ffn_norm(model, layer)
    if norm is None:
        return lambda ffn_out, layer_out, delta: layer_out + delta
    dt = next(norm.parameters()).dtype

    def combine(ffn_out: torch.Tensor, layer_out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return layer_out - norm(ffn_out.to(dt)).float() + norm((ffn_out + delta).to(dt)).float()

    return combine


def with_ffn_delta(model: nn.Module, layer: int, ffn_out: torch.Tensor, layer_out: torch.Tensor,
                   delta: torch.Tensor) -> torch.Tensor:
    """The layer's output had its FFN output been ``ffn_out + delta`` (all (B, T, D)); see ``ffn_delta_fn``."""
    return ffn_delta_fn(model, layer)(ffn_out, layer_out, delta)


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
    """Fitted weights per content key, as a directory of safetensors parts (written atomically).

    Each part has an index (``.json``, written after the part) with its keys and the part's sha256.
    A part without its index was interrupted; a part that does not match its sha256 (truncated or
    changed), or cannot be read, is ignored with a warning: its edits are fitted again.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict[str, torch.Tensor]]:
        found: dict[str, dict[str, torch.Tensor]] = {}
        for part in sorted(self.root.glob("part-*.safetensors")):
            meta_path = part.with_suffix(".json")
            if not meta_path.is_file():
                continue  # a part without its index was interrupted before completion
            try:
                meta = json.loads(meta_path.read_text())
                keys = meta["keys"]
                if "sha256" in meta and file_sha256(part) != meta["sha256"]:
                    raise ValueError("the part does not match its sha256 (truncated or changed)")
                tensors = load_file(part)
                if any(t.shape[0] != len(keys) for t in tensors.values()):
                    raise ValueError(f"the part does not hold {len(keys)} edits")
            except Exception as e:  # json, safetensors and our checks raise several types
                warnings.warn(f"{part}: damaged fitted weights, its edits are fitted again: {e}")
                continue
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
        meta_tmp.write_text(json.dumps({"keys": keys, "sha256": file_sha256(part)}))
        os.replace(meta_tmp, part.with_suffix(".json"))

    def export(self, dst: Path, keep: Callable[[str], bool] = lambda key: True) -> int:
        """Write the stored weights whose key ``keep`` accepts into the store at ``dst`` as one part; returns
        how many. Parts already there stay, so stores fitted elsewhere merge by copying."""
        found = {k: v for k, v in self.load().items() if keep(k)}
        if not found:
            return 0
        keys = sorted(found)
        names = found[keys[0]].keys()
        if any(found[k].keys() != names for k in keys):
            raise ValueError(f"{self.root}: the parts hold different tensors; they cannot be written as one part")
        WeightStore(dst).add(keys, {n: torch.stack([found[k][n] for k in keys]) for n in names})
        return len(keys)


def _adam_step(w, grad, state, lr, rows, b1=0.9, b2=0.999, eps=1e-8):
    m, v, t = state["m"], state["v"], state["t"]
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad * grad
    t[rows] += 1
    tt = t[rows].unsqueeze(1).float()
    mhat = m[rows] / (1 - b1**tt)
    vhat = v[rows] / (1 - b2**tt)
    w[rows] -= lr * mhat / (vhat.sqrt() + eps)


class _Vocab:
    """The candidate vocabulary of a fit (``FitConfig.head_candidates``): on most steps the cross-entropy is
    taken over the tokens that rank in the top ``k`` at some scored position on the last whole-vocabulary
    step, plus every target token; each ``refresh``-th step uses the whole vocabulary and renews the set.
    An edit is only declared done after a check on the whole vocabulary. ``k == 0``: always the whole vocabulary.
    """

    def __init__(self, k: int, refresh: int):
        self.k, self.refresh = k, refresh
        self.ids: torch.Tensor | None = None  # sorted token ids, or None for the whole vocabulary

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keep: bool = False) -> None:
        if not self.k:
            return
        found = [labels, logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices.flatten()]
        if keep and self.ids is not None:
            found.append(self.ids)
        self.ids = torch.cat(found).unique()

    def index(self, labels: torch.Tensor) -> torch.Tensor:
        """Column of each token id in the candidate logits."""
        return torch.searchsorted(self.ids, labels)


def _status(ce, correct, owner, n_rows, row_edit, main_of_row, n_active, min_share):
    """Per active edit: mean loss over its rows, whether its prompt row is right, whether enough other rows are.

    ``ce`` and ``correct`` are per scored position; ``owner`` maps positions to rows, ``row_edit`` rows to
    active edits, ``main_of_row`` marks each edit's prompt row.
    """
    row_loss = textbatch.per_row_mean(ce, owner, n_rows)
    edit_loss = torch.zeros(n_active).index_add(0, row_edit, row_loss)
    edit_loss = edit_loss / torch.bincount(row_edit, minlength=n_active).clamp(min=1)
    row_ok = textbatch.per_row_all(correct, owner, n_rows)
    main_ok = torch.zeros(n_active, dtype=torch.bool).index_put((row_edit[main_of_row],), row_ok[main_of_row])
    other = ~main_of_row
    n_other = torch.zeros(n_active).index_add(0, row_edit[other], torch.ones(int(other.sum())))
    other_ok = torch.zeros(n_active).index_add(0, row_edit[other], row_ok[other].float())
    share_ok = other_ok >= min_share * n_other - 1e-6  # True for edits with no other rows
    return edit_loss, main_ok, share_ok


def _fit_chunk(model, layer, batch, edit_of_row, n_edits, w0, cfg, w_init=None, min_share=None, max_steps=None):
    """Optimise one chunk of edits; returns weights, success, steps and loss per edit.

    ``edit_of_row`` (R,) maps rows to edits; an edit's first row is its own prompt, the others are
    rewordings or prefixed copies. Success is the prompt's row reproducing the target; an edit stops
    training once it succeeds and at least ``min_share`` (default ``cfg.min_variant_share``) of its
    other rows do too. ``w_init`` (E, P) continues from given weights instead of ``w0``. The model may
    run in a lower precision than float32; the neuron and its gradients stay in float32.
    """
    min_share = cfg.min_variant_share if min_share is None else min_share
    max_steps = cfg.max_steps if max_steps is None else max_steps
    is_main = torch.ones_like(edit_of_row, dtype=torch.bool)
    is_main[1:] = edit_of_row[1:] != edit_of_row[:-1]  # (R,) rows of an edit are contiguous, prompt first
    # (R, T, D) each: FFN input, FFN output, layer output; float32 whatever the model computes in
    x_all, f_all, h_all = layer_states_by_length(model, layer, batch, cfg.chunk_size)
    act = neuron.activation_fn(cfg.act, model)
    d = x_all.shape[-1]
    dtype = next(model.parameters()).dtype
    combine = ffn_delta_fn(model, layer)
    w = (w0.expand(n_edits, -1) if w_init is None else w_init).clone()  # (E, P)
    state = {"m": torch.zeros_like(w), "v": torch.zeros_like(w), "t": torch.zeros(n_edits, dtype=torch.long)}
    done = torch.zeros(n_edits, dtype=torch.bool)
    success = torch.zeros(n_edits, dtype=torch.bool)
    steps = torch.zeros(n_edits, dtype=torch.long)
    loss_out = torch.full((n_edits,), float("nan"))
    holder: dict = {}
    vocab = _Vocab(cfg.head_candidates, cfg.head_refresh)
    with last_ffn_at(model, holder), replay_from(model, layer + 1, holder):
        for step in range(max_steps + 1):
            active = (~done).nonzero().flatten()  # (A,) edits still training
            if active.numel() == 0:
                break
            row_sel = torch.isin(edit_of_row, active).nonzero().flatten()
            main_of_row = is_main[row_sel]  # (R',) the edit prompt's own row
            sub = _select_rows(batch, row_sel)
            remap = torch.full((n_edits,), -1, dtype=torch.long)
            remap[active] = torch.arange(active.numel())
            row_edit = remap[edit_of_row[row_sel]]  # (R',) index into active
            w_act = w[active].clone().requires_grad_(True)
            k, v, b = neuron.unpack(w_act[row_edit], d)  # (R', D), (R', D), (R',)
            x = x_all.index_select(0, row_sel)  # (R', T, D)
            z = act(torch.einsum("rtd,rd->rt", x, k) + b[:, None])  # (R', T)
            delta = z.unsqueeze(-1) * v[:, None, :]  # (R', T, D)
            holder["rows"], holder["cols"] = sub.rows, sub.cols
            holder["h"] = combine(f_all.index_select(0, row_sel), h_all.index_select(0, row_sel), delta).to(dtype)
            hidden = textbatch.hidden_at(model, sub)  # (N, D) at the target positions
            full_step = vocab.ids is None or step % vocab.refresh == 0
            if full_step:
                logits = textbatch.head_logits(model, hidden)
                labels = sub.labels
                vocab.update(logits.detach(), sub.labels)
            else:
                logits = textbatch.head_logits(model, hidden, vocab.ids)
                labels = vocab.index(sub.labels)
            ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            correct = logits.argmax(-1) == labels
            edit_loss, main_ok, share_ok = _status(ce, correct, sub.owner, row_sel.numel(), row_edit, main_of_row,
                                                   active.numel(), min_share)
            finished = main_ok & share_ok
            report_loss = edit_loss.detach()
            if not full_step:  # a candidate-vocabulary step: check on the whole vocabulary what it would decide
                check = finished.clone() if step < max_steps else torch.ones_like(finished)
                pos = check[row_edit[sub.owner]]
                if pos.any():
                    with torch.no_grad():
                        exact = textbatch.head_logits(model, hidden[pos])
                    vocab.update(exact, sub.labels[pos], keep=True)
                    ce_x, correct_x = ce.detach().clone(), correct.clone()
                    ce_x[pos] = torch.nn.functional.cross_entropy(exact, sub.labels[pos], reduction="none")
                    correct_x[pos] = exact.argmax(-1) == sub.labels[pos]
                    report_loss, main_x, share_x = _status(ce_x, correct_x, sub.owner, row_sel.numel(), row_edit,
                                                           main_of_row, active.numel(), min_share)
                    main_ok = torch.where(check, main_x, main_ok)
                    finished = main_ok & share_x  # unchecked edits: share_x is share_ok
            if cfg.stop == "margin":
                finished &= report_loss < cfg.margin_ce
            loss_out[active] = report_loss
            success[active] = main_ok
            if step == max_steps:
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
                elif cfg.optimizer == "nesterov":
                    state["m"][rows] = cfg.momentum * state["m"][rows] + grad
                    w[rows] -= cfg.lr * (grad + cfg.momentum * state["m"][rows])
                else:
                    w[rows] -= cfg.lr * grad
            steps[rows] += 1
    return w, success, steps, loss_out


def keep_questions(edit: "EditRequest", bank: "TemplateBank", n: int, taken: list[str] = ()) -> list[str]:
    """Up to ``n`` questions on the edit's subject from other relations (``FitConfig.n_keep``): deterministic
    per edit, none equal to the prompt or to a question in ``taken``."""
    if n <= 0 or not edit.subject:
        return []
    seed = int(edit.content_key[8:16], 16)  # other digits than the context questions' seed
    seen = {normalise_prompt(q) for q in [edit.prompt, *taken]}
    out: list[str] = []
    for j in range(4 * n):  # the bank cycles through its relations; a few more draws cover repeats
        q = bank.other_relation(edit.prompt, edit.subject, seed + j)
        if q and normalise_prompt(q) not in seen:
            seen.add(normalise_prompt(q))
            out.append(q)
            if len(out) == n:
                break
    return out


@torch.no_grad()
def base_first_tokens(model: nn.Module, tok, questions: list[str]) -> list[int]:
    """The model's greedy first answer token to each question (no neuron attached)."""
    batch = textbatch.encode_ids(tok, questions, [[0]] * len(questions))  # scored at each prompt's last token
    return textbatch.head_logits(model, textbatch.hidden_at(model, batch)).argmax(-1).tolist()


def _compute_copy(loaded: lm.LoadedModel, dtype: str) -> nn.Module:
    """The model itself, or a frozen copy in ``dtype`` (made once per loaded model and kept)."""
    target = getattr(torch, dtype)
    if next(loaded.model.parameters()).dtype == target:
        return loaded.model
    key = f"fit_copy_{dtype}"
    if key not in loaded.extra:
        import copy

        loaded.extra[key] = copy.deepcopy(loaded.model).to(target).eval().requires_grad_(False)
    return loaded.extra[key]


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


def _finish(model, tok, layer, edits, keys, results, w0, cfg) -> int:
    """Continue each failed edit on its prompt alone (``cfg.finish_steps`` at most), in place in ``results``;
    returns how many of them now succeed.

    A fit stops at ``max_steps`` when its other rows pull against the prompt; a few steps on the prompt
    alone usually make it state the target. The finished weights are not stored (the store keeps the
    fit itself), so this runs again, identically, whenever failed edits are loaded.
    """
    failed = list({k: e for k, e in zip(keys, edits) if not bool(results[k]["success"])}.items())
    n_finished = 0
    for start in range(0, len(failed), cfg.chunk_size):
        chunk = failed[start : start + cfg.chunk_size]
        batch = textbatch.encode(tok, [e.prompt for _, e in chunk], [e.target_new for _, e in chunk], cfg.suffix)
        w_init = torch.stack([results[k]["w"] for k, _ in chunk]).to(cfg.device)
        w, ok, more, loss = _fit_chunk(model, layer, batch.to(cfg.device), torch.arange(len(chunk)), len(chunk),
                                       w0.to(cfg.device), cfg, w_init=w_init, min_share=0.0,
                                       max_steps=cfg.finish_steps)
        for i, (k, _) in enumerate(chunk):
            old = results[k]
            results[k] = {"w": w[i].detach().cpu(), "success": ok[i], "steps": old["steps"] + more[i], "loss": loss[i]}
        n_finished += int(ok.sum())
    return n_finished


def edit_rows(e: "EditRequest", bank: "TemplateBank | None", cfg: FitConfig,
              prefixes: list[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """(texts fitted to the edit's target: its prompt first, then rewordings, other-relation questions and
    prefixed copies; questions whose base answer the neuron keeps; questions also fitted as chat turns) for
    one edit."""
    rewordings = bank.variants(e.prompt, e.subject, cfg.n_variants, e.target_new) if bank is not None else []
    n_contexts = cfg.n_contexts or (cfg.context_fallback if cfg.n_variants and not rewordings else 0)
    if bank is not None and n_contexts:
        seed = int(e.content_key[:8], 16)  # deterministic per edit, different across edits
        found = (bank.other_relation(e.prompt, e.subject, seed + j, fitted=True) for j in range(n_contexts))
        rewordings += list(dict.fromkeys(q for q in found if q))
    keep = keep_questions(e, bank, 0 if n_contexts else cfg.n_keep, taken=rewordings) if bank is not None else []
    chat = ([e.prompt] + rewordings)[: cfg.chat_contexts]
    return [e.prompt] + rewordings + [f"{p} {e.prompt}" for p in prefixes], keep, chat


def store_key(e: "EditRequest", texts: list[str], keep: list[str], chat: list[str] = ()) -> str:
    """The fit store's key of an edit: its content and every text it is fitted on."""
    blob = json.dumps([e.content_key, texts, keep] + ([list(chat)] if chat else []), ensure_ascii=False)
    return f"{e.content_key}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def chat_row(tok, question: str) -> str:
    """A question as a user turn of the chat template, ready for the answer, as ``textbatch`` encodes it (a
    beginning-of-sequence token the tokenizer adds itself is not written twice)."""
    from meg.generation import chat_prompt

    text = chat_prompt(tok, question)
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos) and tok("", add_special_tokens=True).input_ids[:1] == [tok.bos_token_id]:
        text = text[len(bos):]
    return text


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
    without one, ``n_variants`` must be 0. An edit is stored under its content and the texts it is
    fitted on (``store_key``), so a changed rewording fits it again.
    """
    if cfg.uses_bank and bank is None:
        raise ConfigError("fit: 'n_variants', 'n_contexts' or 'n_keep' > 0 needs a template bank "
                          "(meg.augment.TemplateBank)")
    t0 = time.time()
    model, tok = loaded.model, loaded.tokenizer
    layer = cfg.layer if cfg.layer is not None else loaded.default_layer
    d = lm.hidden_size(model)
    inter = getattr(model.config, "intermediate_size", None) or getattr(model.config, "n_inner", None)
    w0 = neuron.shared_init(d, inter, seed=cfg.seed)
    store = WeightStore(Path(store_dir) / cfg.key(loaded.content_hash, layer)) if store_dir else None
    known = store.load() if store else {}
    prefixes = context_prefixes(loaded, cfg.n_prefixes, cfg.prefix_tokens, cfg.seed)
    rows_of = {e.content_key: edit_rows(e, bank, cfg, prefixes) for e in edits}
    skeys = {k: store_key(e, *rows_of[k]) for e in edits if (k := e.content_key)}
    keys = [e.content_key for e in edits]
    todo = sorted({k: e for k, e in zip(keys, edits) if skeys[k] not in known}.values(), key=lambda e: len(e.prompt))
    results: dict[str, dict[str, torch.Tensor]] = {k: known[skeys[k]] for k in keys if skeys[k] in known}
    work = _compute_copy(loaded, cfg.dtype) if todo else model
    bar = tqdm(total=len(todo), desc=f"fit L{layer}", unit="edit", disable=not progress)
    for start in range(0, len(todo), cfg.chunk_size):
        chunk = todo[start : start + cfg.chunk_size]
        prompts, target_ids, edit_of_row, keep_rows = [], [], [], []
        for i, e in enumerate(chunk):
            texts, keep, chat = rows_of[e.content_key]
            ids = textbatch.target_ids(tok, e.target_new, cfg.suffix)
            for text in texts:
                prompts.append(text)
                target_ids.append(ids)
                edit_of_row.append(i)
            if chat:
                from meg.generation import turn_end_ids

                answer = tok(e.target_new.strip(), add_special_tokens=False).input_ids + turn_end_ids(tok)
                for q in chat:
                    prompts.append(chat_row(tok, q))
                    target_ids.append(answer)
                    edit_of_row.append(i)
            for text in keep:
                keep_rows.append(len(prompts))
                prompts.append(text)
                target_ids.append(None)  # the base model's answer, filled in below
                edit_of_row.append(i)
        if keep_rows:
            answers = base_first_tokens(model, tok, [prompts[r] for r in keep_rows])
            for r, a in zip(keep_rows, answers):
                target_ids[r] = [a]
        batch = textbatch.encode_ids(tok, prompts, target_ids).to(cfg.device)
        rows = torch.tensor(edit_of_row)
        w, ok, steps, loss = _fit_chunk(work, layer, batch, rows, len(chunk), w0.to(cfg.device), cfg)
        if work is not model:  # check, and where needed finish, each edit prompt in full precision
            main = torch.ones_like(rows, dtype=torch.bool)
            main[1:] = rows[1:] != rows[:-1]
            prompt_rows = _select_rows(batch, main.nonzero().flatten())
            w, ok, more, loss = _fit_chunk(model, layer, prompt_rows, torch.arange(len(chunk)), len(chunk),
                                           w0.to(cfg.device), cfg, w_init=w, min_share=0.0,
                                           max_steps=cfg.fixup_steps)
            steps = steps + more
        tensors = {"w": w.detach().cpu(), "success": ok, "steps": steps, "loss": loss}
        chunk_keys = [e.content_key for e in chunk]
        if store:
            store.add([skeys[k] for k in chunk_keys], tensors)
        for i, key in enumerate(chunk_keys):
            results[key] = {name: t[i] for name, t in tensors.items()}
        bar.update(len(chunk))
        bar.set_postfix(ok=f"{sum(int(results[k]['success']) for k in chunk_keys)}/{len(chunk)}")
    bar.close()
    n_finished = _finish(model, tok, layer, edits, keys, results, w0, cfg) if cfg.finish_steps else 0
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
        n_finished=n_finished,
        contexts={k: rows_of[k][0] + rows_of[k][1] + rows_of[k][2] for k in keys},
    )
