"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): batched least-squares edits
of the FFN output projections of several layers.

Notation (paper -> code): R = ``layers`` (ascending), L = the last of them; for edit i, z_i is the
target residual at L (``meg.baselines.targets``), k_i^l its key at layer l and h_i^L the residual
the current model gives (``meg.baselines.keys``); C0 = E[k k^T] over the local corpus
(``meg.baselines.covariance``), lambda = ``mom2_weight``. For l in R in order:

    K = [k_i^l]           (N, I)  keys, with the layers below l already edited
    Res = (z - h^L) / (number of layers of R from l on)      (N, D)  residual spread over them
    Delta = Res^T K (lambda C0 + K^T K)^-1                   (D, I)
    W_out^l += Delta

AlphaEdit (``meg.baselines.alphaedit``) shares all of this but the solve. ``batch_size`` > 0 edits
sequentially in batches (z and keys of a batch are read from the model edited by the batches
before it); 0 edits all at once, as the evaluation protocol does.

Models that normalise the FFN output before adding it to the residual (Gemma-3's post-feedforward
RMSNorm: block output = h + g * m / rms(m), m = W_out k) break the linear picture: a change of m
moves the residual by g / rms(m) times it, and by at most the norm's bounded output. With
``post_norm_targets`` (default) Res is first mapped to the change of m whose normalised image is the
point of the norm's image {o : rms(o / g) = 1} nearest to norm(m) + Res: m' = |m| v / |v| with v =
that point / g (v = m / rms(m) where |g| is almost 0, a unit this layer cannot write). So norm(m') =
norm(m) + Res whenever the norm can output it, and otherwise the layer closes as much of Res as it
can (never less than none); Delta then solves for m' - m instead of Res. Families without
such a norm are unaffected.

Resuming: z are stored per edit (content key); each layer's Delta is stored per run (model, edits,
settings), so an interrupted run re-applies the finished layers and goes on from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from meg import lm
from meg.baselines import covariance, keys, targets
from meg.baselines.corpus import CorpusConfig
from meg.baselines.targets import TargetConfig
from meg.errors import ConfigError
from meg.evaluate import EditedLM, Editor

if TYPE_CHECKING:
    from meg.facts import EditRequest


SOLVER = 2  # bumped when the layer updates of given settings change (the post-FFN norm mapping: 2)


@dataclass
class LeastSquaresConfig:
    """Settings MEMIT and AlphaEdit share."""

    layers: tuple[int, ...] | None = None  # edited layers, ascending; None = the registry's default
    target: TargetConfig = field(default_factory=TargetConfig)  # how z is optimised
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # where C0 comes from
    batch_size: int = 0  # edits per sequential batch; 0 = one batch
    post_norm_targets: bool = True  # map residuals through a post-FFN norm first (Gemma-3; see above)
    cache: bool = True  # store z and per-layer updates under $MEG_HOME/baselines (resume, reuse)
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target, dict):
            self.target = TargetConfig(**self.target)
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
                raise ConfigError(f"{self.method}: bad value for 'layers': {self.layers!r} (distinct, ascending, >= 0)")
        if self.batch_size < 0:
            raise ConfigError(f"{self.method}: bad value for 'batch_size': {self.batch_size!r}")

    method = "memit"

    def key(self, model_hash: str, edit_keys: list[str]) -> str:
        settings = asdict(self)
        settings.pop("progress")
        settings["target"].pop("chunk_size")
        blob = json.dumps({"method": self.method, "model": model_hash, "edits": edit_keys, "solver": SOLVER,
                           **settings},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class MEMITConfig(LeastSquaresConfig):
    mom2_weight: float = 15000.0  # lambda: weight of the corpus keys' second moment C0

    method = "memit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mom2_weight > 0:
            raise ConfigError(f"memit: bad value for 'mom2_weight': {self.mom2_weight!r}")


def default_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """For a model without a registry entry: the early-middle band MEMIT edits in GPT-J (3-8 of 28)."""
    n = lm.num_layers(model)
    first = max(1, round(0.13 * n))
    return tuple(range(first, max(first, round(0.3 * n)) + 1))


def _closest_on_image(t: torch.Tensor, gain: torch.Tensor, writable: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """(N, D) point of the norm's image {o : rms(o / gain) = 1} nearest to each row of ``t``, as o / gain.

    Lagrange: o_j = t_j g_j^2 / (g_j^2 + mu), with mu found by bisection per row so the constraint
    holds (mu = 0 when t is on the image); units that cannot be written are left at 0 here.
    """
    g2 = gain.pow(2).where(writable, torch.zeros_like(gain))
    tg = (t * gain).where(writable, torch.zeros_like(t))  # (N, D)
    d = gain.numel()

    def o_over_g(mu: torch.Tensor) -> torch.Tensor:  # (N, D) for each row's mu
        return tg / (g2 + mu[:, None]).where(writable, torch.ones_like(g2))

    def excess(mu: torch.Tensor) -> torch.Tensor:  # sum (o_j / g_j)^2 - D, decreasing in mu
        return o_over_g(mu).pow(2).sum(1) - d

    n = t.shape[0]
    lo = torch.full((n,), -float(g2[writable].min()) * (1 - 1e-9), dtype=t.dtype)
    hi = torch.ones(n, dtype=t.dtype)
    while bool((short := excess(hi) > 0).any()):  # widen until every row's root is bracketed
        hi = torch.where(short, hi * 4, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = excess(mid) > 0
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return o_over_g((lo + hi) / 2)


def through_post_norm(model: torch.nn.Module, layer: int, m: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """(N, D) change of the FFN output projection's output ``m`` (N, D) that moves the block output by
    ``res`` (N, D) through the layer's post-FFN norm, or as near as the norm's image allows (see the
    module docstring); ``res`` itself if the layer has no such norm."""
    norm = lm.post_ffn_norm(model, layer)
    if norm is None:
        return res
    dt = next(norm.parameters()).dtype
    with torch.no_grad():
        gain = norm(torch.ones(1, m.shape[1], dtype=dt)).double()[0]  # (D,) the norm's per-unit scale
        m = m.double()
        o = norm(m.to(dt)).double()  # (N, D)
        unit = m / m.pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-12)  # m / rms(m)
        writable = gain.abs() > 1e-3 * gain.abs().median()
        v = torch.where(writable, _closest_on_image(o + res.double(), gain, writable), unit)
        target = v * (m.norm(dim=1, keepdim=True) / v.norm(dim=1, keepdim=True).clamp(min=1e-12))
    return target - m


def z_root() -> Path:
    """Where the z of every edit are stored (per model, layer and z settings below it)."""
    return lm.meg_home() / "baselines" / "z"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class LeastSquaresEditor(Editor):
    """The MEMIT procedure with a pluggable solve (``_solve``) and per-batch state."""

    name = "memit"
    config_class: type = MEMITConfig

    def __init__(self, cfg: LeastSquaresConfig | None = None):
        self.cfg = cfg

    def config_for(self, loaded: lm.LoadedModel) -> LeastSquaresConfig:
        from meg.baselines.registry import config_for

        return self.cfg if self.cfg is not None else config_for(self.name, loaded)

    # ---- the parts AlphaEdit replaces

    def _begin(self, loaded, layers, c0: dict[int, torch.Tensor], cfg) -> dict:
        return {"c0": c0}

    def _solve(self, k: torch.Tensor, res: torch.Tensor, layer: int, state: dict, cfg) -> torch.Tensor:
        """(N, I) keys, (N, D) residuals -> (D, I) update (float64)."""
        c = cfg.mom2_weight * state["c0"][layer].double() + k.T @ k  # (I, I)
        adj = torch.linalg.solve(c, k.T)  # (I, N)
        return res.T @ adj.T

    def _end_batch(self, loaded, batch, layers, prefixes, state, cfg, run_dir, b) -> None:
        pass

    def _report(self, state: dict) -> dict:
        return {}

    # ---- the shared procedure

    def store_targets(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> int:
        """Optimise and store the z of ``edits`` as ``apply`` would for them in its first batch, without
        editing; returns how many were stored. N processes given disjoint parts of an edit set fill the
        shared z store on N cores before the run that edits finds every z there."""
        cfg = self.config_for(loaded)
        if not cfg.cache:
            raise ConfigError(f"{self.name}: storing z needs 'cache' on (the store is where they go)")
        if cfg.batch_size:
            raise ConfigError(f"{self.name}: the z of a sequential batch depend on the batches before it "
                              f"(batch_size {cfg.batch_size}); only one-batch edits (batch_size 0) can be stored ahead")
        layers = cfg.layers or default_layers(loaded.model)
        found = targets.target_vectors(loaded, list(edits), layers[-1], cfg.target, z_root(), cfg.progress)
        return len({e.content_key for e in edits} & found.keys())

    def tuning_texts(self) -> list[str]:
        from meg.baselines.registry import tuning_texts

        loaded = getattr(self, "_loaded", None)  # the model of the last apply
        return tuning_texts(self.name, loaded) if loaded is not None and self.cfg is None else []

    def apply(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> EditedLM:
        self._loaded = loaded
        cfg = self.config_for(loaded)
        layers = cfg.layers or default_layers(loaded.model)
        n_layers = lm.num_layers(loaded.model)
        if layers[-1] + 1 >= n_layers:
            raise ConfigError(f"{self.name}: bad value for 'layers': {layers!r} (the model has {n_layers} layers; "
                              "the last edited one must be below its last layer)")
        weights = {l: lm.out_proj_weight(loaded.model, l) for l in layers}  # (D, I) views
        originals = {l: w.detach().clone() for l, w in weights.items()}

        def restore() -> None:
            with torch.no_grad():
                for l, w in weights.items():
                    w.copy_(originals[l])

        try:
            info = self._edit(loaded, list(edits), cfg, layers, weights)
        except BaseException:
            restore()
            raise
        edited = EditedLM(loaded, restore=restore)
        edited.extra_metrics = info
        return edited

    def _edit(self, loaded, edits, cfg, layers, weights) -> dict:
        t0 = time.time()
        home = lm.meg_home() / "baselines"
        z_dir = z_root() if cfg.cache else None
        run_dir = home / self.name / cfg.key(loaded.content_hash, [e.content_key for e in edits]) if cfg.cache else None
        if run_dir:
            run_dir.mkdir(parents=True, exist_ok=True)
        c0 = covariance.second_moments(loaded, list(layers), cfg.corpus, progress=cfg.progress)
        t_stats = time.time() - t0
        state = self._begin(loaded, layers, c0, cfg)
        prefixes = targets.templates(loaded, cfg.target)
        size = cfg.batch_size or max(1, len(edits))
        batches = [edits[i : i + size] for i in range(0, len(edits), size)]
        last = layers[-1]
        info = {"z_loss": [], "z_steps": [], "residual_before": [], "residual_after": []}
        t_z = t_keys = 0.0
        for b, batch in enumerate(batches):
            t1 = time.time()
            # Later batches read z from the model the earlier ones edited: key the store by them.
            salt = hashlib.sha256("".join(e.content_key for bb in batches[:b] for e in bb).encode()).hexdigest()[:8]
            z_store = (z_dir / salt) if (z_dir and b) else z_dir
            found = targets.target_vectors(loaded, batch, last, cfg.target, z_store, cfg.progress)
            z = torch.stack([found[e.content_key]["z"] for e in batch])  # (N, D)
            info["z_loss"] += [float(found[e.content_key]["loss"]) for e in batch]
            info["z_steps"] += [int(found[e.content_key]["steps"]) for e in batch]
            t_z += time.time() - t1
            h_start = None
            for i, l in enumerate(layers):
                path = run_dir / f"b{b}-l{l}.safetensors" if run_dir else None
                if path is not None and path.is_file():
                    delta = load_file(path)["delta"]
                else:
                    t1 = time.time()
                    k = keys.edit_keys(loaded, batch, l, prefixes, cfg.progress).double()  # (N, I)
                    if cfg.post_norm_targets and loaded.arch.post_ffn_norm:
                        h, m = keys.edit_hidden_and_ffn_out(loaded, batch, last, l, cfg.progress)  # (N, D) each
                    else:
                        h, m = keys.edit_hidden(loaded, batch, last, cfg.progress), None
                    if h_start is None:
                        h_start = h
                    res = (z - h).double() / (len(layers) - i)  # (N, D)
                    if m is not None:
                        res = through_post_norm(loaded.model, l, m, res)
                    t_keys += time.time() - t1
                    delta = self._solve(k, res, l, state, cfg).float()  # (D, I)
                    if path is not None:
                        _save(path, {"delta": delta})
                with torch.no_grad():
                    weights[l] += delta.to(weights[l].device)
            h_end = keys.edit_hidden(loaded, batch, last, cfg.progress)
            if h_start is not None:
                info["residual_before"].append(float((z - h_start).norm(dim=1).mean()))
            info["residual_after"].append(float((z - h_end).norm(dim=1).mean()))
            self._end_batch(loaded, batch, layers, prefixes, state, cfg, run_dir, b)
        n = max(1, len(edits))
        return {
            "layers": list(layers),
            "z_loss_mean": sum(info["z_loss"]) / n,
            "z_steps_mean": sum(info["z_steps"]) / n,
            "residual_before": info["residual_before"],
            "residual_after": info["residual_after"],
            "stats_seconds": t_stats,
            "z_seconds": t_z,
            "keys_seconds": t_keys,
            "seconds": time.time() - t0,
            **self._report(state),
        }


class MEMIT(LeastSquaresEditor):
    name = "memit"
    label = "MEMIT"
    config_class = MEMITConfig
