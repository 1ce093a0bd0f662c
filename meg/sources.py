"""Weight sources: where a routed query's neuron weights come from.

An edited model has one ``WeightSource``, chosen by the ``weights`` setting (``MegConfig.weights``,
``generator.weights`` in params.yaml) when the model is built or its bundle loaded (``weight_source``,
``load_source``); nothing on the query path looks at that setting again. Given one routed batch
(``RoutedBatch``: the queries, their embeddings, the routed mask, each query's nearest edit and the
rows that are an edit's own prompt), ``WeightSource.weights`` returns the (B, P) neuron weights of the
batch; rows that are not routed get zeros.

- ``LookupSource`` (``weights: lookup``, the default): a routed query gets the fitted weights of the
  edit it is routed to. It keeps the fitted weights (``lookup``) and reads no other setting.
- ``DiffusionSource`` (``weights: generator``, the paper's MeG): a routed query gets weights sampled
  by the diffusion generator (``meg.generator``) from its condition (``join_conditions``), with seeded
  noise (``sample_seed``), so answers are deterministic. With ``exact_prompts`` a query that is an
  edit's own prompt (after ``meg.facts.normalise_prompt``) is routed to that edit and gets its fitted
  weights. It owns the generator settings (``generator``, ``generator_condition``,
  ``generator_variants``), ``exact_prompts`` and ``sample_seed``.

Each source also says what a build trains for it (``train``: the generator stage is skipped unless
``trains_generator``) and writes and reads its own part of a bundle (``save``, ``load``). The
bundle files are those of bundle format 1: ``generator/``, ``cond_encoder/``, the ``lookup`` and
``edit_cond`` tensors of ``weights.safetensors`` and ``edit_prompts.json``, each present only when
the source keeps it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meg.errors import BundleError

if TYPE_CHECKING:
    from meg.editor import MegConfig


@dataclass
class RoutedBatch:
    """One routed batch of queries: what a weight source needs to give each its neuron weights."""

    queries: list[str]
    emb: torch.Tensor  # (B, C) query embeddings
    mask: torch.Tensor  # (B,) bool: routed to an edit
    nearest: torch.Tensor  # (B,) row of the edit each query is routed to (meaningful where ``mask``)
    exact: set[int] = field(default_factory=set)  # rows that are an edit's own prompt (routed to that edit)


class WeightSource:
    """Neuron weights (B, P) for routed queries; see the module docstring."""

    kind = ""  # the ``weights`` setting this source implements
    label = ""  # the method's name in results and tables
    trains_generator = False  # whether a build trains the diffusion generator for it

    def __init__(self, dim: int):
        self.dim = int(dim)  # P, the neuron's parameter count

    def weights(self, batch: RoutedBatch, steps: int | None = None, per_edit: bool = False) -> torch.Tensor:
        """(B, P) weights of the batch, zeros where not routed. ``steps`` (denoising steps) and ``per_edit``
        (one sample per edit, from its prompt, reused for every query routed to it) are the answer path's speed
        options; a source that samples nothing ignores them."""
        raise NotImplementedError

    def exact_edits(self, queries: list[str]) -> dict[int, int]:
        """Query row -> edit row, for queries that are an edit's own prompt and answered as that edit."""
        return {}

    def prepare(self, steps: int | None = None, per_edit: bool = False) -> None:
        """Compute now what ``weights`` with these options would otherwise compute on the first call."""

    # ---- building and bundles

    @classmethod
    def kept(cls, cfg: "MegConfig", weights: torch.Tensor, prompts: list[str]):
        """(fitted weights, edit prompts) this source keeps in a bundle; None where it needs none."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: "MegConfig", dim: int, **parts) -> "WeightSource":
        """The source from its parts (``lookup``, ``generator``, ``cond_encoder``, ``edit_cond``, ``edit_emb``,
        ``edit_prompts``); parts it does not use are ignored."""
        raise NotImplementedError

    @classmethod
    def train(cls, cfg: "MegConfig", edits: list, weights: torch.Tensor, w0: torch.Tensor, encoder, bank,
              edit_emb: torch.Tensor | None = None, ckpt_dir: Path | None = None,
              progress: bool = True) -> tuple["WeightSource", list[tuple[str, str | None]]]:
        """(the source of a build, the rewordings it trained on as (text, subject)) from the fitted ``weights``
        (N, P) of ``edits`` and ``w0``; ``encoder`` is the query encoder, ``bank`` the template bank."""
        raise NotImplementedError

    def save(self, out: Path) -> dict[str, torch.Tensor]:
        """Write this source's files into the bundle directory ``out``; returns its tensors for
        ``weights.safetensors``."""
        raise NotImplementedError

    @classmethod
    def load(cls, cfg: "MegConfig", bundle: Path, tensors: dict[str, torch.Tensor], dim: int,
             edit_emb: torch.Tensor | None = None) -> "WeightSource":
        """The source saved in ``bundle`` (``tensors``: its ``weights.safetensors``)."""
        raise NotImplementedError


class LookupSource(WeightSource):
    """``weights: lookup``: a routed query gets its routed edit's fitted weights."""

    kind = "lookup"
    label = "MeG, lookup weights"

    def __init__(self, lookup: torch.Tensor | None, dim: int | None = None):
        if lookup is None:
            raise BundleError("weights 'lookup' needs the fitted weights of the edits (lookup)")
        super().__init__(lookup.shape[1] if dim is None else dim)
        self.lookup = lookup  # (N, P) fitted weights, one row per edit

    def weights(self, batch: RoutedBatch, steps: int | None = None, per_edit: bool = False) -> torch.Tensor:
        w = torch.zeros(len(batch.queries), self.dim)
        routed = batch.mask.nonzero().flatten().tolist()
        if routed:
            w[routed] = self.lookup[batch.nearest[routed]]
        return w

    @classmethod
    def kept(cls, cfg, weights, prompts):
        return weights, None

    @classmethod
    def from_config(cls, cfg, dim, lookup=None, **parts):
        return cls(lookup, dim)

    @classmethod
    def train(cls, cfg, edits, weights, w0, encoder, bank, edit_emb=None, ckpt_dir=None, progress=True):
        return cls(weights, w0.numel()), []

    def save(self, out: Path) -> dict[str, torch.Tensor]:
        return {"lookup": self.lookup.contiguous()}

    @classmethod
    def load(cls, cfg, bundle, tensors, dim, edit_emb=None):
        if "lookup" not in tensors:
            raise BundleError(f"{bundle}: weights 'lookup' but the bundle lacks the fitted weights "
                              "(lookup in weights.safetensors)")
        return cls(tensors["lookup"], dim)


class DiffusionSource(WeightSource):
    """``weights: generator``: a routed query gets weights the diffusion generator samples from its condition;
    with ``exact_prompts``, an edit's own prompt gets that edit's fitted weights."""

    kind = "generator"
    label = "MeG, generated weights"
    trains_generator = True

    def __init__(self, generator, dim: int, sample_seed: int = 0, cond_encoder=None,
                 edit_cond: torch.Tensor | None = None, edit_emb: torch.Tensor | None = None,
                 lookup: torch.Tensor | None = None, edit_prompts: list[str] | None = None,
                 exact_prompts: bool = False):
        if generator is None:
            raise BundleError("weights 'generator' needs a trained weight generator")
        super().__init__(dim)
        self.generator, self.sample_seed = generator, sample_seed
        # generator_condition "tuned+base": the base encoder and the edit prompts' conditions (N, C'); "tuned":
        # neither, and the edit prompts' conditions are their query embeddings (the router's ``edit_emb``)
        self.cond_encoder, self.edit_cond, self.edit_emb = cond_encoder, edit_cond, edit_emb
        self.lookup = lookup
        self.edit_prompts = list(edit_prompts) if edit_prompts is not None else None
        self._exact: dict[str, int] = {}  # normalised edit prompt -> row of ``lookup`` (first of a repeated prompt)
        if exact_prompts:
            if self.edit_prompts is None or lookup is None or len(self.edit_prompts) != lookup.shape[0]:
                raise BundleError("exact_prompts needs the edit prompts and their fitted weights, one row each")
            from meg.facts import normalise_prompt

            for i, p in enumerate(self.edit_prompts):
                self._exact.setdefault(normalise_prompt(p), i)
        self._per_edit: dict[int | None, torch.Tensor] = {}  # denoising steps -> (N, P) ``edit_weights``

    def conditions(self, queries: list[str], emb: torch.Tensor) -> torch.Tensor:
        """The generator's conditions (n, C') of queries whose query embeddings are ``emb`` (n, C)."""
        return join_conditions(emb, self.cond_encoder, queries)

    def edit_conditions(self) -> torch.Tensor:
        """(N, C') the generator's conditions of the edit prompts."""
        return self.edit_cond if self.cond_encoder is not None else self.edit_emb

    def sample(self, queries: list[str], emb: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """(n, P) generated weights of queries whose query embeddings are ``emb`` (n, C)."""
        return self.generator.sample(self.conditions(queries, emb), steps=steps, seed=self.sample_seed)

    def edit_weights(self, steps: int | None = None) -> torch.Tensor:
        """(N, P) generated weights of every edit, from its prompt's condition; computed once per ``steps``.

        DDIM sampling starts every row from the same seeded noise, so an edit prompt sampled as a query gets
        these very weights (up to rounding of batched products).
        """
        if steps not in self._per_edit:
            self._per_edit[steps] = self.generator.sample(self.edit_conditions(), steps=steps, seed=self.sample_seed)
        return self._per_edit[steps]

    def weights(self, batch: RoutedBatch, steps: int | None = None, per_edit: bool = False) -> torch.Tensor:
        w = torch.zeros(len(batch.queries), self.dim)
        fitted = sorted(batch.exact)
        generated = [r for r in batch.mask.nonzero().flatten().tolist() if r not in batch.exact]
        if fitted:
            w[fitted] = self.lookup[batch.nearest[fitted]]
        if generated:
            if per_edit:
                w[generated] = self.edit_weights(steps)[batch.nearest[generated]]
            else:
                w[generated] = self.sample([batch.queries[i] for i in generated], batch.emb[generated], steps)
        return w

    def exact_edits(self, queries: list[str]) -> dict[int, int]:
        if not self._exact:
            return {}
        from meg.facts import normalise_prompt

        found = ((i, self._exact.get(normalise_prompt(q))) for i, q in enumerate(queries))
        return {i: j for i, j in found if j is not None}

    def prepare(self, steps: int | None = None, per_edit: bool = False) -> None:
        if per_edit and self.edit_conditions() is not None:
            self.edit_weights(steps)

    @classmethod
    def kept(cls, cfg, weights, prompts):
        return (weights, list(prompts)) if cfg.exact_prompts else (None, None)

    @classmethod
    def from_config(cls, cfg, dim, generator=None, cond_encoder=None, edit_cond=None, edit_emb=None, lookup=None,
                    edit_prompts=None, **parts):
        return cls(generator, dim, cfg.sample_seed, cond_encoder, edit_cond, edit_emb, lookup, edit_prompts,
                   cfg.exact_prompts)

    @classmethod
    def train(cls, cfg, edits, weights, w0, encoder, bank, edit_emb=None, ckpt_dir=None, progress=True):
        from meg.editor import condition_encoder, generator_pairs, train_generator

        cond, rows, texts = generator_pairs(cfg, edits, encoder, bank, with_texts=True)
        trained_on = [(t, edits[r].subject) for t, r in zip(texts[len(edits):], rows[len(edits):])]
        generator = train_generator(cfg, cond, weights[rows], w0, ckpt_dir=ckpt_dir, progress=progress)
        cond_encoder = condition_encoder(cfg)
        edit_cond = cond[: len(edits)] if cond_encoder is not None else None
        lookup, prompts = cls.kept(cfg, weights, [e.prompt for e in edits])
        return cls.from_config(cfg, w0.numel(), generator=generator, cond_encoder=cond_encoder, edit_cond=edit_cond,
                               edit_emb=edit_emb, lookup=lookup, edit_prompts=prompts), trained_on

    def save(self, out: Path) -> dict[str, torch.Tensor]:
        self.generator.save(out / "generator")
        tensors = {"lookup": self.lookup.contiguous()} if self.lookup is not None else {}
        if self.cond_encoder is not None:
            self.cond_encoder.save(out / "cond_encoder")
            tensors["edit_cond"] = self.edit_cond.contiguous()
        if self.edit_prompts is not None:
            (out / "edit_prompts.json").write_text(json.dumps(self.edit_prompts, ensure_ascii=False))
        return tensors

    @classmethod
    def load(cls, cfg, bundle, tensors, dim, edit_emb=None):
        from meg.encoder import QueryEncoder
        from meg.generator import WeightGenerator

        if not (bundle / "generator").exists():
            raise BundleError(f"{bundle}: weights 'generator' but the bundle has no generator/")
        generator = WeightGenerator.load(bundle / "generator")
        cond_encoder = QueryEncoder.load(bundle / "cond_encoder") if (bundle / "cond_encoder").exists() else None
        if (cond_encoder is None) != ("edit_cond" not in tensors):
            raise BundleError(f"{bundle}: a generator condition encoder needs the edit conditions and back "
                              "(cond_encoder/ and edit_cond in weights.safetensors)")
        prompts_file = bundle / "edit_prompts.json"
        edit_prompts = json.loads(prompts_file.read_text(encoding="utf-8")) if prompts_file.is_file() else None
        if cfg.exact_prompts and (edit_prompts is None or "lookup" not in tensors):
            raise BundleError(f"{bundle}: exact_prompts is on but the bundle lacks edit_prompts.json or the "
                              "fitted weights (lookup in weights.safetensors)")
        return cls.from_config(cfg, dim, generator=generator, cond_encoder=cond_encoder,
                               edit_cond=tensors.get("edit_cond"), edit_emb=edit_emb, lookup=tensors.get("lookup"),
                               edit_prompts=edit_prompts)


SOURCES: dict[str, type[WeightSource]] = {LookupSource.kind: LookupSource, DiffusionSource.kind: DiffusionSource}


def source_class(cfg: "MegConfig") -> type[WeightSource]:
    """The weight source class ``cfg.weights`` chooses: the one place that reads the setting."""
    return SOURCES[cfg.weights]


def weight_source(cfg: "MegConfig", dim: int, **parts) -> WeightSource:
    """The weight source of a model with configuration ``cfg`` from its parts (``WeightSource.from_config``)."""
    return source_class(cfg).from_config(cfg, dim, **parts)


def load_source(cfg: "MegConfig", bundle: Path, tensors: dict[str, torch.Tensor], dim: int,
                edit_emb: torch.Tensor | None = None) -> WeightSource:
    """The weight source saved in a bundle with configuration ``cfg``."""
    return source_class(cfg).load(cfg, Path(bundle), tensors, dim, edit_emb)


def join_conditions(emb: torch.Tensor, cond_encoder, texts: list[str]) -> torch.Tensor:
    """Generator conditions: ``emb`` (n, C) itself, or with ``cond_encoder`` the unit vector of both
    unit embeddings side by side (n, C + C2), each half weighing alike in a cosine."""
    if cond_encoder is None:
        return emb
    import torch.nn.functional as F

    other = cond_encoder.encode(list(texts)).to(emb.device, emb.dtype)
    return F.normalize(torch.cat([F.normalize(emb, dim=-1), F.normalize(other, dim=-1)], dim=-1), dim=-1)
