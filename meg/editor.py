"""The MeG editor and the edited model: query -> encoder -> router -> generator -> neuron -> LM.

Building (``MegEditor.apply`` or ``build``):
1. fit one neuron per edit (``meg.fit``);
2. take the query encoder, fine-tuned with InfoNCE on pseudo-edits (``meg.encoder``), cached per
   configuration because it does not depend on the edit set;
3. fit the router on the edit prompts' embeddings and calibrate its threshold on held-out
   pseudo-edits of the same count (``meg.router``);
4. train the diffusion weight generator on (prompt embedding, fitted weights) (``meg.generator``).

Step 4 runs only with ``weights: generator``: the ``weights`` setting chooses the model's weight source
(``meg.sources``) once, when it is built or loaded.

Answering (``EditedModel``): every prompt of a batch is embedded and routed; the weight source gives
the routed prompts their neuron weights (``lookup``: the routed edit's fitted weights; ``generator``:
weights sampled from the generator, seeded, so answers are deterministic), the others get none, and
one batched forward pass serves them all.

``EditedModel.save(dir)`` writes a bundle: the encoder, router, the weight source's part (the fitted
weights; the generator), w0 and a manifest with the base model id and content hash, the layer, every
config and the package versions, plus a sha256 of every file. ``load`` refuses a bundle whose files
or base model do not match.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meg import evaluate, fit, lm, sources
from meg.generator import CONDITIONS
from meg.errors import BundleError, ConfigError
from meg.hashing import file_sha256
from meg.sources import join_conditions

if TYPE_CHECKING:
    from meg.facts import EditRequest

BUNDLE_FORMAT = 1


# MeG's router settings where they differ from RouterConfig's own: the relation check is on, chosen on held-out
# pseudo-edits (dev score 87.7 -> 90.5 on average at 500-2,500 edits, docs/experiments/history.md §4.3.1); it
# compares the sentence that names the subject, and a question asked after other context is embedded with the
# question alone mixed in (0.7 of it). On 500 held-out pseudo-edits asked in CounterFact's own paraphrases
# (``bench.devset``, ``bench.routing``; docs/results.md "Routing"): paraphrases routed to their edit 57.4% -> 68.8%
# (those after context 20.7% -> 90.2%), locality prompts routed 3.2% both
ROUTER_DEFAULTS = {"relation_check": True, "relation_scope": "sentence", "question_view": 0.7}


@dataclass
class MegConfig:
    # Chosen on held-out pseudo-edits whose paraphrases are never fitted (docs/experiments/rewordings.md):
    # 4 model-written rewordings, the margin stop and 2 context prefixes carry an edit's own neuron to 89.8% of
    # those paraphrases (prompt alone, first success: 28.9%); the prompt also fitted as a chat turn makes it
    # answer paraphrases asked as user turns in 95.8% (88.5% without; 99.0% with 2 chat rows, which cap every
    # fit at max_steps and cost raw transfer)
    fit: fit.FitConfig = field(default_factory=lambda: fit.FitConfig(
        n_variants=4, context_fallback=4, head_candidates=64, head_refresh=10, stop="margin", n_prefixes=2,
        chat_contexts=1))
    encoder: dict = field(default_factory=dict)  # overrides of meg.encoder.EncoderConfig
    # "nearest" (cosine to the nearest edit), "familiarity" (the paper's) or "off" (the ablation: every
    # question is routed, to its nearest edit by cosine, with no threshold)
    router: str = "nearest"
    # overrides of meg.router.RouterConfig, on top of ROUTER_DEFAULTS (given options add to those, they do not
    # replace them)
    router_options: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)  # overrides of meg.generator.GeneratorConfig
    # The weight source (meg.sources): "lookup" (the routed edit's own fitted weights) or "generator" (the paper's
    # MeG: weights generated per question by the diffusion model). Decided on 1,000 held-out pseudo-edits (docs/experiments/history.md §2.5):
    # Score 96.8 with lookup against 94.9 generated (Gen AG 90.3 against 84.0), and no generator to train.
    weights: str = "lookup"
    generator_variants: bool = True  # also train the generator on rewordings' embeddings -> the edit's weights
    # What the generator is conditioned on: "tuned" (the query encoder's embedding, as the router uses it) or
    # "tuned+base" (that embedding joined with the base encoder's). The tuned encoder maps questions on one
    # subject close together (ZsRE: 152 of 1,037 edit prompts have another at cosine >= 0.99, 16 under the base
    # encoder); joining the base embedding keeps such conditions apart. Measured on the 1,037 ZsRE edits'
    # training pairs (docs/experiments/history.md §2.3): relative error 0.209 -> 0.127 after 1,500 steps.
    generator_condition: str = "tuned+base"
    # A question that is an edit's own prompt (after facts.normalise_prompt) gets that edit's fitted weights
    # instead of generated ones: the stored fact is stated as fitted, and the generator's approximation error
    # only matters for other wordings. Off: every routed question gets generated weights (the paper's MeG).
    exact_prompts: bool = True
    # overrides of meg.rewrite.RewriteConfig: the model-written rewordings of edits and pseudo-edits (the only
    # rewordings a build fits or trains on: CounterFact's own paraphrase templates are probes, meg.probes)
    rewrite: dict = field(default_factory=dict)
    # pseudo-edit paraphrases keep the context sentences their CounterFact record puts before the question, in
    # front of the model-written rewording (``with_rewordings``): the encoder and the calibration see questions
    # asked after other context, as people and CounterFact ask them. On 500 held-out pseudo-edits (with the router
    # defaults): paraphrases routed to their edit 68.8% -> 78.6%, locality prompts routed 3.2% both, questions on
    # an edited subject's other relations routed 10.6% -> 14.0% (docs/results.md "Routing")
    pseudo_context: bool = True
    n_pseudo_encoder: int = 5000  # train-split pseudo-edits for the encoder
    n_pseudo_calibration: int = 2000  # held-out train-split pseudo-edits for the router threshold
    sample_seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.fit, dict):
            self.fit = fit.FitConfig(**self.fit)
        self.router_options = {**ROUTER_DEFAULTS, **self.router_options}
        if self.router not in ("nearest", "familiarity", "off"):
            raise ConfigError(f"meg: bad value for 'router': {self.router!r} (nearest, familiarity, off)")
        if self.weights not in sources.SOURCES:
            raise ConfigError(f"meg: bad value for 'weights': {self.weights!r} ({', '.join(sorted(sources.SOURCES))})")
        if self.generator_condition not in CONDITIONS:
            raise ConfigError(f"meg: bad value for 'generator_condition': {self.generator_condition!r} "
                              f"({', '.join(CONDITIONS)})")


# the keyword options of the evaluation harness's text generation (``evaluate.EditedLM.generate``)
HARNESS_OPTIONS = frozenset(inspect.signature(evaluate.EditedLM.generate).parameters) - {"self", "prompts",
                                                                                          "max_new_tokens"}


class EditedModel(evaluate.EditedLM):
    """A base model answering with MeG's neuron, its weights given per query by the model's weight source.

    ``source`` (a ``meg.sources.WeightSource``) is made from ``cfg`` and the parts (``generator``, ``lookup``,
    ``cond_encoder``, ``edit_cond``, ``edit_prompts``) unless given; parts the chosen source does not use are
    dropped.
    """

    def __init__(self, loaded, layer, act, encoder, router, generator, w0, cfg: MegConfig,
                 lookup: torch.Tensor | None = None, info: dict | None = None, batch_size: int = 32,
                 cond_encoder=None, edit_cond: torch.Tensor | None = None, edit_prompts: list[str] | None = None,
                 edit_targets: list[str] | None = None, source: "sources.WeightSource | None" = None):
        super().__init__(loaded, self._weights_for, layer=layer, act=act, batch_size=batch_size)
        # the edits' targets, by row: a routed answer's neuron is switched off once it states its edit's target
        self.edit_targets = list(edit_targets) if edit_targets is not None else None
        self.encoder, self.router, self.w0 = encoder, router, w0
        self.cfg, self.info = cfg, info or {}
        if source is None:
            source = sources.weight_source(cfg, w0.numel(), generator=generator, lookup=lookup,
                                           cond_encoder=cond_encoder, edit_cond=edit_cond,
                                           edit_emb=getattr(router, "edit_emb", None), edit_prompts=edit_prompts)
        self.source = source
        self.extra_metrics: dict = {}
        self.exposure = None  # meg.probes.Exposure of the build that made this model (not saved in bundles)
        self.cache_size = 8192  # prompts whose neuron weights are kept (about 4.6 KB each for SmolLM2)
        self._cache: OrderedDict[str, tuple[torch.Tensor, bool, int]] = OrderedDict()

    def route(self, prompts: list[str]):
        emb, r = self.route_detail(prompts)
        return emb, r.mask, r.nearest, r.confidence

    def route_detail(self, prompts: list[str]):
        """(query embeddings, ``router.Routing``) of ``prompts``."""
        from meg.router import ROUTED, Routing

        emb = self.encoder.encode(prompts)
        if self.router is None:  # router off, in a bundle without the edit embeddings: no nearest edit known
            n = len(prompts)
            return emb, Routing(torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), torch.ones(n),
                                [ROUTED] * n, torch.full((n,), float("nan")))
        return emb, self.router.route_detail(emb, prompts, self.encoder.encode)

    # the weight source's parts, None where it has none
    generator = property(lambda self: getattr(self.source, "generator", None), doc="The weight generator.")
    lookup = property(lambda self: getattr(self.source, "lookup", None), doc="(N, P) fitted weights kept.")
    cond_encoder = property(lambda self: getattr(self.source, "cond_encoder", None),
                            doc="The generator's second condition encoder (generator_condition 'tuned+base').")
    edit_cond = property(lambda self: getattr(self.source, "edit_cond", None),
                         doc="(N, C') the edit prompts' conditions kept with the condition encoder.")
    edit_prompts = property(lambda self: getattr(self.source, "edit_prompts", None),
                            doc="The edit prompts kept for exact_prompts.")

    def conditions(self, prompts: list[str], emb: torch.Tensor) -> torch.Tensor:
        """The generator's conditions for prompts whose query embeddings are ``emb`` (n, C) (generated weights)."""
        return self.source.conditions(prompts, emb)

    def sample_weights(self, prompts: list[str], emb: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """(n, P) generated neuron weights for prompts whose query embeddings are ``emb`` (n, C) (generated
        weights)."""
        return self.source.sample(prompts, emb, steps)

    def route_exact(self, prompts: list[str]):
        """``route`` with every prompt that is an edit's own prompt (``exact_prompts``) routed to that edit:
        (emb, mask, nearest, confidence, the set of such rows)."""
        emb, r, exact = self.route_exact_detail(prompts)
        return emb, r.mask, r.nearest, r.confidence, exact

    def route_exact_detail(self, prompts: list[str]):
        """``route_exact`` as (emb, ``router.Routing``, the set of exact rows); an exact row's reason is EXACT.
        Which prompts are exact, the weight source says (``WeightSource.exact_edits``)."""
        from meg.router import EXACT

        emb, r = self.route_detail(prompts)
        exact: set[int] = set()
        for i, j in self.source.exact_edits(prompts).items():
            r.mask[i], r.nearest[i], r.reason[i] = True, j, EXACT
            exact.add(i)
        return emb, r, exact

    def route_batch(self, prompts: list[str]) -> "sources.RoutedBatch":
        """The routed batch (``route_exact``) a weight source takes."""
        emb, r, exact = self.route_exact_detail(prompts)
        return sources.RoutedBatch(list(prompts), emb, r.mask, r.nearest, exact)

    def edit_conditions(self) -> torch.Tensor:
        """(N, C') the generator's conditions of the edit prompts (generated weights)."""
        return self.source.edit_conditions()

    def _weights_for(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Neuron weights (B, P) and routed mask (B,) for a batch; a prompt seen before is not re-sampled.

        Sampling is seeded per call and a row's sample does not depend on the other rows, so the
        cache returns what a fresh call would (evaluation asks for each prompt several times).
        """
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            batch = self.route_batch(todo)
            w = self.source.weights(batch)
            for i, p in enumerate(todo):
                self._cache[p] = (w[i], bool(batch.mask[i]), int(batch.nearest[i]))
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        hits = [self._cache[p] for p in prompts]
        for p in prompts:
            self._cache.move_to_end(p)
        return torch.stack([h[0] for h in hits]), torch.tensor([h[1] for h in hits])

    def routed_edits(self, prompts: list[str]) -> list[int | None]:
        """Per prompt, the row of the edit it is routed to, or None (routes what is not cached yet)."""
        todo = [p for p in prompts if p not in self._cache]
        if todo:
            self._weights_for(todo)
        return [self._cache[p][2] if self._cache[p][1] else None for p in prompts]

    def release_texts(self, prompts: list[str]) -> list[str | None] | None:
        """Per prompt, its routed edit's target (None when not routed, or the bundle does not know targets)."""
        if self.edit_targets is None:
            return None
        return [self.edit_targets[j] if j is not None and j < len(self.edit_targets) else None
                for j in self.routed_edits(prompts)]

    def explain(self, prompts: list[str]) -> list[dict]:
        _, r, exact = self.route_exact_detail(prompts)
        return [{"routed": bool(r.mask[i]), "nearest": int(r.nearest[i]), "confidence": float(r.confidence[i]),
                 "exact": i in exact, **self.why(r, i)} for i in range(len(prompts))]

    def why(self, r, i: int) -> dict:
        """Why query ``i`` of the ``router.Routing`` r was or was not routed: {"reason": ...}, with the relation
        check's cosine and cut where it compared the query with its nearest edit."""
        out = {"reason": r.reason[i]}
        c = float(r.relation[i])
        if not math.isnan(c):
            out.update(relation_cosine=round(c, 4), relation_cut=round(float(self.router.config.relation_cut), 4))
        return out

    # ---- bundle -------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.encoder.save(tmp / "encoder")
        if self.router is not None:
            self.router.save(tmp / "router")
        from safetensors.torch import save_file

        tensors = {"w0": self.w0.contiguous(), **self.source.save(tmp)}
        save_file(tensors, str(tmp / "weights.safetensors"))
        if self.edit_targets is not None:
            (tmp / "edit_targets.json").write_text(json.dumps(self.edit_targets, ensure_ascii=False))
        manifest = {
            "format": BUNDLE_FORMAT,
            "base_model": self.loaded.model_id,
            "base_model_hash": self.loaded.content_hash,
            "layer": self.layer,
            "act": self.act,
            "config": _config_dict(self.cfg),
            "info": self.info,
            "versions": _versions(),
            "files": _hash_tree(tmp),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        # swap directories: the old bundle is moved aside, not deleted, until the new one is in place
        old = out.with_name(out.name + ".old")
        import shutil

        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return out

    @classmethod
    def load(cls, bundle: str | Path, loaded: lm.LoadedModel | None = None) -> "EditedModel":
        from safetensors.torch import load_file

        from meg.encoder import QueryEncoder
        from meg.router import load_router

        bundle = Path(bundle)
        manifest_path = bundle / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"{bundle}: not an edit bundle (no manifest.json)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise BundleError(f"{manifest_path}: corrupted manifest: {e}") from e
        actual = _hash_tree(bundle, skip={"manifest.json"})
        if actual != manifest.get("files"):
            bad = sorted(set(actual.items()) ^ set(manifest.get("files", {}).items()))
            raise BundleError(f"{bundle}: files do not match the manifest (corrupted or changed): "
                              f"{', '.join(sorted({k for k, _ in bad}))}")
        if loaded is None:
            loaded = lm.load_model(manifest["base_model"])
        if loaded.content_hash != manifest["base_model_hash"]:
            raise BundleError(
                f"{bundle}: built for base model {manifest['base_model']} with hash "
                f"{manifest['base_model_hash'][:12]}, but the loaded model has hash {loaded.content_hash[:12]}"
            )
        cfg = _config_from_dict(manifest["config"])
        tensors = load_file(str(bundle / "weights.safetensors"))
        encoder = QueryEncoder.load(bundle / "encoder")
        router = load_router(bundle / "router") if (bundle / "router").exists() else None
        source = sources.load_source(cfg, bundle, tensors, tensors["w0"].numel(), getattr(router, "edit_emb", None))
        targets_file = bundle / "edit_targets.json"
        edit_targets = json.loads(targets_file.read_text(encoding="utf-8")) if targets_file.is_file() else None
        return cls(loaded, manifest["layer"], manifest["act"], encoder, router, None, tensors["w0"], cfg,
                   info=manifest.get("info"), edit_targets=edit_targets, source=source)

    # ---- using the edited model (meg.answer) ----------------------------------------------------

    def answer(self, questions: list, explain: bool = False, max_new_tokens: int | None = None,
               **options) -> dict:
        """``{"answers": [...]}`` (+ ``"explanations"``): what the CLI, the service and the pyfunc model return.

        Each question is asked as a user turn of the base model's chat template when it has one (``chat=False``:
        completed as raw text); a question may be a list of chat messages. ``options`` are further
        ``meg.answer.AnswerConfig`` fields (chat, release, stop_at_newline, sample_steps, weight_cache).
        """
        from meg.answer import AnswerConfig, answer

        return answer(self, list(questions), explain, AnswerConfig(max_new_tokens=max_new_tokens, **options))

    def generate(self, inputs=None, max_new_tokens: int = evaluate.MAX_NEW_TOKENS, *, input_ids=None,
                 attention_mask=None, **generate_kwargs):
        """Generate like a transformers model, every row routed on its own prompt.

        Token ids in (``input_ids`` / ``attention_mask``, or a tensor as ``inputs``), token ids out:
        (B, T + new), prompt included, as ``transformers`` returns them; any generate option works
        (``do_sample``, ``temperature``, ``num_beams``, ...). Text in (a string or a list of strings),
        text out: the continuations, as every ``EditedLM`` of the evaluation harness returns them
        (with its ``expected`` option, or with transformers options); ``generate_ids`` gives their ids.
        """
        if input_ids is None and isinstance(inputs, torch.Tensor):
            input_ids = inputs
        if input_ids is not None:
            from meg.answer import generate_hf

            return generate_hf(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        prompts = [inputs] if isinstance(inputs, str) else list(inputs)
        own = HARNESS_OPTIONS
        if set(generate_kwargs) <= own:
            return super().generate(prompts, max_new_tokens, **generate_kwargs)
        if own & set(generate_kwargs):
            raise TypeError(f"generate: {', '.join(sorted(own & set(generate_kwargs)))} (the evaluation's options) "
                            "cannot be combined with transformers options")
        tok = self.loaded.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True)
        from meg.answer import generate_hf

        ids = generate_hf(self, enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, **generate_kwargs)
        return [tok.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True) for row in ids]

    def routing_records(self, edits: "list[EditRequest]") -> list[dict]:
        """Per edit: how its prompt, paraphrase and locality prompt were routed (for reports; never tuned on).

        ``*_nearest`` is the id of the nearest edit of this model; ``fit_ok`` whether fitting reached the target.
        """
        ids = self.info.get("edit_ids") or []
        failed = set((self.info.get("fit") or {}).get("failed_ids") or [])
        out = [{"prompt": e.prompt, "paraphrase": e.paraphrases[0] if e.paraphrases else None,
                "locality_prompt": e.locality[0].prompt if e.locality else None,
                "fit_ok": e.id not in failed if e.id in ids else None} for e in edits]
        for kind, field in (("rel", "prompt"), ("gen", "paraphrase"), ("loc", "locality_prompt")):
            rows = [i for i, r in enumerate(out) if r[field]]
            if not rows:
                continue
            _, mask, nearest, conf, exact = self.route_exact([out[i][field] for i in rows])
            for j, i in enumerate(rows):
                n = int(nearest[j])
                out[i].update({f"{kind}_routed": bool(mask[j]), f"{kind}_nearest": ids[n] if n < len(ids) else n,
                               f"{kind}_confidence": round(float(conf[j]), 4), f"{kind}_exact": j in exact})
        return out


class MegEditor(evaluate.Editor):
    """MeG behind the evaluation harness."""

    name = "meg"

    def __init__(self, cfg: MegConfig | None = None, work_dir: str | Path | None = None, progress: bool = True):
        self.cfg = cfg or MegConfig()
        self.work_dir = Path(work_dir) if work_dir else None
        self.progress = progress

    @property
    def label(self) -> str:
        return sources.source_class(self.cfg).label

    def apply(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> EditedModel:
        model = build(loaded, edits, self.cfg, self.work_dir, self.progress, probes=self.probes)
        model.extra_metrics = {
            "timings": model.info.get("timings", {}),
            "fit": model.info.get("fit"),
            "n_pseudo_pool": model.info.get("n_pseudo_pool"),
            "n_rewordings": model.info.get("n_rewordings"),
            "calibration": model.info.get("calibration"),
            "router_confusion": router_confusion(model, edits, template_bank_of(edits)),
        }
        return model


def pseudo_pool(edits: "list[EditRequest]", blocklist=None) -> list:
    """Pseudo-edits: CounterFact *train* records sharing no key and no text with any benchmark edit
    (every record of the CounterFact edit split and of ZsRE, edited or not, probes included) nor with this
    edit set, and holding no text of ``blocklist`` (``meg.probes``: what the evaluation will ask).

    They train the encoder and calibrate the router; the evaluated edits never enter either.
    Excluding every benchmark edit, not only the edited ones, keeps the pool (so the encoder's
    training pairs and the calibration set) the same when benchmark facts are added to an edit set;
    only user facts that collide with a train record shrink it. Their paraphrases are still
    CounterFact's: ``with_rewordings`` swaps each for a model-written rewording before any use.
    """
    keys, texts = _keys_and_texts(edits)
    blocked = blocklist.texts if blocklist is not None else frozenset()
    return [_without_blocked_locality(e, blocked) for e in _benchmark_free_pool()
            if not _collides(e, keys, texts) and not _holds(e, blocked)]


@functools.lru_cache(maxsize=1)
def _benchmark_free_pool() -> tuple:
    """CounterFact train records sharing no key, prompt or paraphrase with a benchmark edit, and no prompt or
    paraphrase with a benchmark probe; a record whose locality prompt is a benchmark probe keeps no locality
    prompt (CounterFact's neighbourhood prompts repeat across splits: 28% of the train records' are
    evaluated ones)."""
    from meg.facts import BENCHMARKS, load_benchmark
    from meg.probes import benchmark_blocklist

    keys, texts = _keys_and_texts([e for name, split in BENCHMARKS if split != "train"
                                   for e in load_benchmark(name, split)])
    probes = benchmark_blocklist().texts
    return tuple(_without_blocked_locality(e, probes) for e in load_benchmark("counterfact", "train")
                 if e.paraphrases and e.locality and not _collides(e, keys, texts) and not _holds(e, probes))


def _keys_and_texts(edits) -> tuple[set[str], set[str]]:
    """Content keys, and prompts and paraphrases, of edits: what a pseudo-edit must not share."""
    return {e.content_key for e in edits}, {t for e in edits for t in (e.prompt, *e.paraphrases)}


def _collides(record, keys: set[str], texts: set[str]) -> bool:
    own = {record.prompt, *record.paraphrases[:1], *(q.prompt for q in record.locality[:1])}
    return record.content_key in keys or bool(own & texts)


def _holds(record, blocked: frozenset) -> bool:
    """Whether a pool record's prompt or paraphrase is a blocked text (``meg.probes.norm_text`` form)."""
    from meg.probes import norm_text

    return any(norm_text(t) in blocked for t in (record.prompt, *record.paraphrases[:1]))


def _without_blocked_locality(record, blocked: frozenset):
    """The record, without its locality prompt when that is a blocked text."""
    import dataclasses

    from meg.probes import norm_text

    if record.locality and norm_text(record.locality[0].prompt) in blocked:
        return dataclasses.replace(record, locality=())
    return record


def build_blocklist(edits: "list[EditRequest]", probes=None):
    """What a build of ``edits`` must not fit, train or calibrate on: the benchmark probes, the probes the
    evaluation asks of ``edits`` (their first paraphrase and locality prompt) and the given ``probes``."""
    from meg.probes import Blocklist, benchmark_blocklist

    return benchmark_blocklist() | Blocklist.of_probes(edits) | (probes or Blocklist())


def rewordings_for(loaded: lm.LoadedModel, cfg: MegConfig, blocklist, progress: bool = True,
                   cache_dir: Path | None = None):
    """The model-written rewordings of a build (``meg.rewrite.Rewordings``), filtered by ``blocklist``."""
    from meg.rewrite import RewriteConfig, Rewordings, Rewriter

    rewriter = Rewriter(loaded, RewriteConfig(**cfg.rewrite), cache_dir=cache_dir, progress=progress)
    return Rewordings(rewriter, blocklist, base_encoder(cfg).encode, canonical=_canonical_items())


def _canonical_items() -> list:
    """The fixed population a relation template's representative is chosen from (``meg.rewrite.Rewordings``):
    the pseudo-edit pool and every benchmark edit, so a benchmark slice's rewordings do not depend on the slice."""
    from meg.facts import BENCHMARKS, load_benchmark

    records = [*_benchmark_free_pool(), *(e for name, split in BENCHMARKS if split != "train"
                                          for e in load_benchmark(name, split))]
    return [(e.prompt, e.subject, _answers(e)) for e in records]


def with_rewordings(pool: list, rewordings, n_needed: int | None = None, keep_context: bool = False) -> list:
    """The pool with each record's paraphrase a rewording it may be trained on: its own when the blocklist
    allows it, else a model-written one (the record's index picks among its template's, so records of one
    template do not all get the same). Records left with none are dropped. Once ``n_needed`` records have
    one, the rest keep their prompt only (no paraphrase: they are filler and statements, never pairs), so
    only the templates of the records used are rewritten. With ``keep_context``, a model-written rewording keeps
    the sentences of other context the record's own paraphrase puts before its question (``leading_context``),
    so the pairs ask in the form people and CounterFact do: some context, then the question."""
    import dataclasses

    out: list = []
    n_pairs, start, block = 0, 0, 256
    while start < len(pool) and (n_needed is None or n_pairs < n_needed):
        part = pool[start : start + block]
        rewordings.prepare((e.prompt, e.subject, _answers(e)) for e in part)
        for e in part:
            if n_needed is not None and n_pairs >= n_needed:
                out.append(dataclasses.replace(e, paraphrases=()))
                continue
            own = e.paraphrases[0]
            if not rewordings.blocklist.blocks_rewording(own, e.subject):
                out.append(e)
            else:
                found = rewordings.of(e.prompt, e.subject, 8, _answers(e))
                if not found:
                    continue
                text = found[(start + len(out)) % len(found)]
                context = leading_context(own, e.subject) if keep_context else ""
                out.append(dataclasses.replace(e, paraphrases=(f"{context} {text}" if context else text,)))
            n_pairs += 1
        start += block
    out.extend(dataclasses.replace(e, paraphrases=()) for e in pool[start:])
    return out


def leading_context(text: str, subject: str | None) -> str:
    """What ``text`` says before the sentence that names ``subject`` last ("" when that sentence starts it)."""
    from meg.subject_gate import question_start

    return text[: question_start(text, subject) or 0].strip()


def split_pool(pool: list) -> tuple[list, list]:
    """(pseudo-edits with a paraphrase: pairs for the encoder and calibration, in order; the others)."""
    return [e for e in pool if e.paraphrases], [e for e in pool if not e.paraphrases]


def edit_rewordings(edits: "list[EditRequest]", rewordings, n: int, user_paraphrases: bool = True) -> dict[str, list[str]]:
    """Per edit prompt, the rewordings its neuron may be fitted on: the fact file's own further paraphrases
    (all but the first, which the evaluation asks) that the blocklist allows, then model-written ones."""
    rewordings.prepare((e.prompt, e.subject, _answers(e)) for e in edits)
    out: dict[str, list[str]] = {}
    for e in edits:
        given = [p for p in e.paraphrases[1:] if user_paraphrases
                 and not rewordings.blocklist.blocks_rewording(p, e.subject)]
        out.setdefault(e.prompt, given + rewordings.of(e.prompt, e.subject, n, _answers(e)))
    return out


def _answers(e) -> tuple[str, ...]:
    return tuple(a for a in (e.target_new, e.target_old) if a)


def template_bank_of(edits: "list[EditRequest]"):
    """The template bank of the pseudo-edits that go with this edit set."""
    from meg.augment import TemplateBank

    return TemplateBank.from_records(pseudo_pool(edits))


def template_bank(cfg: MegConfig, pool: list, edits: "list[EditRequest]" = (), blocklist=None,
                  rewordings: dict[str, list[str]] | None = None):
    """Relation rewordings for fitting: the edits' own (``rewordings``: ``edit_rewordings``), those learned
    from the pseudo-edits (whose paraphrases are rewordings, ``with_rewordings``) and, with
    ``fit.edit_templates``, from the edit set's same-subject prompts; nothing ``blocklist`` blocks. None when
    neither fitting nor the generator uses them."""
    from meg.augment import TemplateBank

    if not (cfg.fit.uses_bank or cfg.generator_variants):
        return None
    bank = TemplateBank.from_records(pool, blocklist)
    bank.rewordings = dict(rewordings or {})
    if edits and cfg.fit.edit_templates > 0:
        bank.link_same_subject(edits, base_encoder(cfg).encode, cfg.fit.edit_templates)
    return bank


def base_encoder(cfg: MegConfig):
    """The sentence encoder before fine-tuning (the one ``cfg.encoder`` names), loaded once per process:
    it is never trained, so the template bank, the generator's conditions and the models share it."""
    names = tuple(sorted((k, cfg.encoder[k]) for k in ("model", "max_length") if k in cfg.encoder))
    return _frozen_encoder(names, cfg.device)


@functools.lru_cache(maxsize=2)
def _frozen_encoder(names: tuple, device: str):
    from meg.encoder import EncoderConfig, QueryEncoder

    return QueryEncoder(EncoderConfig(**dict(names), trainable="none", device=device))


def encoder_triples(cfg: MegConfig, pool: list) -> tuple[list[str], list[str], list[list[str]]]:
    """(anchors, positives, hard negatives) the query encoder is fine-tuned on: the first
    ``n_pseudo_encoder`` pseudo-edits' prompts, their paraphrases (rewordings, ``with_rewordings``), their
    locality prompts and, with ``same_subject_negatives``, a question on the subject from another relation."""
    from meg.augment import TemplateBank
    from meg.encoder import EncoderConfig

    enc_cfg = EncoderConfig(**{"device": cfg.device, **cfg.encoder})
    train = split_pool(pool)[0][: cfg.n_pseudo_encoder]
    negatives = [[e.locality[0].prompt] if e.locality else [] for e in train]
    if enc_cfg.same_subject_negatives:  # templates of the training pairs only: calibration's stay unseen
        bank = TemplateBank.from_records(train)
        for i, e in enumerate(train):
            q = bank.other_relation(e.prompt, e.subject, i)
            if q:
                negatives[i].append(q)
    return [e.prompt for e in train], [e.paraphrases[0] for e in train], negatives


def encoder_for(cfg: MegConfig, pool: list, progress: bool = True, cache_root: Path | None = None):
    """The query encoder, fine-tuned on pseudo-edits; cached by config and every training text.

    The cache lives under ``cache_root`` (default ``$MEG_HOME/encoders``): the encoder does not
    depend on the edit set, so every build with the same settings and pseudo-edits reuses it.
    """
    from meg.encoder import EncoderConfig, QueryEncoder

    enc_cfg = EncoderConfig(**{"device": cfg.device, **cfg.encoder})
    anchors, positives, negatives = encoder_triples(cfg, pool)
    key = hashlib.sha256(json.dumps({"cfg": asdict(enc_cfg), "triples": [anchors, positives, negatives]},
                                    sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    cache = (cache_root or lm.meg_home() / "encoders") / key
    if cache.is_dir():
        try:
            return QueryEncoder.load(cache)
        except Exception:  # an incomplete cache entry: train again
            pass
    encoder = QueryEncoder(enc_cfg)
    if enc_cfg.trainable != "none":
        encoder.finetune(anchors, positives, negatives, progress=progress)
    encoder.save(cache)
    return encoder


def calibration_set(cfg: MegConfig, pool: list, bank=None):
    """Held-out pseudo-edits for the router threshold: disjoint from the encoder's training pairs.

    Positives are their paraphrases; negatives their locality prompts (same relation, another
    subject) and, from the template bank, questions about the same subject on another relation.
    """
    from meg.augment import TemplateBank
    from meg.router import PseudoEdits

    bank = bank or TemplateBank.from_records(pool)
    paired, unpaired = split_pool(pool)
    calib = paired[cfg.n_pseudo_encoder : cfg.n_pseudo_encoder + cfg.n_pseudo_calibration]
    # padding up to the edit count: the encoder's pseudo-edits, then those no stage uses (prompts only)
    filler = paired[: cfg.n_pseudo_encoder] + paired[cfg.n_pseudo_encoder + cfg.n_pseudo_calibration :] + unpaired
    same = [(i, bank.other_relation(e.prompt, e.subject, i)) for i, e in enumerate(calib)]
    return PseudoEdits(
        prompts=tuple(e.prompt for e in calib),
        paraphrases=tuple(e.paraphrases[0] for e in calib),
        unrelated=tuple(e.locality[0].prompt for e in calib if e.locality),
        filler=tuple(e.prompt for e in filler),
        subjects=tuple(e.subject for e in calib),
        filler_subjects=tuple(e.subject for e in filler),
        same_subject=tuple(q for _, q in same if q),
        same_subject_of=tuple(i for i, q in same if q),
    )


ROUTE_ALL = -2.0  # a cosine threshold below every cosine: the router "off" routes every question


def fit_router(cfg: MegConfig, encoder, edits: "list[EditRequest]", pseudo):
    """(router, calibration) fitted on the edit prompts, threshold chosen on the pseudo-edits.

    Router "off": a nearest-edit router that routes every question (threshold below every cosine, no
    calibration, no subject gate), so each question still gets its nearest edit's weights with ``lookup``.
    """
    from meg.router import RouterConfig, build_router

    if cfg.router == "off":
        rcfg = RouterConfig(kind="nearest", threshold=ROUTE_ALL, device=cfg.device)
        return build_router(rcfg, encoder.encode, [e.prompt for e in edits])[0], None
    rcfg = RouterConfig(kind=cfg.router, device=cfg.device, **cfg.router_options)
    return build_router(rcfg, encoder.encode, [e.prompt for e in edits], pseudo, [e.subject for e in edits])


def generator_pairs(cfg: MegConfig, edits: "list[EditRequest]", encoder, bank, with_texts: bool = False):
    """The generator's conditions (M, C) and, per condition, the index of the edit whose weights it maps to
    (and, ``with_texts``, the condition texts).

    Every edit prompt is a condition (the first N rows, in edit order); with ``generator_variants``
    its rewordings from the template bank are too (they map to the same fitted weights).
    """
    from meg.facts import normalise_prompt

    cond_texts, rows = [e.prompt for e in edits], list(range(len(edits)))
    if cfg.generator_variants and bank is not None:
        found = [(i, v) for i, e in enumerate(edits)
                 for v in bank.variants(e.prompt, e.subject, cfg.fit.n_variants or 8, e.target_new)]
        targets: dict[str, set[str]] = {}
        for i, text in found:
            targets.setdefault(normalise_prompt(text), set()).add(normalise_prompt(edits[i].target_new))
        # One condition, one weight vector: a text is a condition once, for the edit whose prompt it is or
        # else for the first edit it rewords; a rewording shared by edits with different targets (both
        # linked to one template) is left out altogether.
        taken = {normalise_prompt(t) for t in cond_texts}
        for i, v in found:
            key = normalise_prompt(v)
            if key not in taken and len(targets[key]) == 1:
                taken.add(key)
                cond_texts.append(v)
                rows.append(i)
    cond = join_conditions(encoder.encode(cond_texts), condition_encoder(cfg), cond_texts)
    return (cond, rows, cond_texts) if with_texts else (cond, rows)


def condition_encoder(cfg: MegConfig):
    """The second encoder of the generator's conditions: the base encoder for "tuned+base", else None."""
    return base_encoder(cfg) if cfg.generator_condition == "tuned+base" else None


def train_generator(cfg: MegConfig, cond: torch.Tensor, weights: torch.Tensor, w0: torch.Tensor,
                    ckpt_dir: Path | None = None, progress: bool = True, init_from=None):
    """The diffusion weight generator trained on (condition, fitted weights) pairs."""
    from meg.generator import GeneratorConfig, WeightGenerator

    generator = WeightGenerator(GeneratorConfig(**{"device": cfg.device, **cfg.generator}))
    generator.fit(cond, weights, w0, ckpt_dir=ckpt_dir, progress=progress, init_from=init_from)
    return generator


@dataclass
class BuildData:
    """What a build fits and trains on besides the edits: the blocklist, the pseudo-edits (paraphrases
    swapped for rewordings), the edits' rewordings and the template bank."""

    blocklist: object  # meg.probes.Blocklist
    pool: list
    rewordings: dict[str, list[str]]
    bank: object  # meg.augment.TemplateBank or None


def build_data(loaded: lm.LoadedModel, edits: "list[EditRequest]", cfg: MegConfig, probes=None,
               progress: bool = True, cache_dir: Path | None = None) -> BuildData:
    """The blocklist (``build_blocklist``), the pseudo-edit pool with model-written paraphrases, the edits'
    rewordings and the template bank of one build; the same for the in-memory build and the pipeline."""
    blocklist = build_blocklist(edits, probes)
    rw = rewordings_for(loaded, cfg, blocklist, progress, cache_dir)
    pool = with_rewordings(pseudo_pool(edits, blocklist), rw, cfg.n_pseudo_encoder + cfg.n_pseudo_calibration,
                           keep_context=cfg.pseudo_context)
    n = max(cfg.fit.n_variants, 8 if cfg.generator_variants else 0)
    rewordings = edit_rewordings(edits, rw, n) if n else {}
    return BuildData(blocklist, pool, rewordings, template_bank(cfg, pool, edits, blocklist, rewordings))


def build_exposure(edits: "list[EditRequest]", cfg: MegConfig, data: BuildData, contexts: dict[str, list[str]],
                   pseudo=None, generator_texts: list[tuple[str, str | None]] = ()):
    """The ``meg.probes.Exposure`` of a build: what the neurons were fitted on, the encoder's training texts,
    the router's calibration texts and the generator's rewording conditions."""
    from meg.probes import Exposure

    exp = Exposure(fitted=dict(contexts))
    anchors, positives, negatives = encoder_triples(cfg, data.pool)
    if cfg.encoder.get("trainable", "all") != "none":
        train = split_pool(data.pool)[0][: cfg.n_pseudo_encoder]
        exp.add_seen(anchors)
        exp.add_seen(t for ns in negatives for t in ns)
        exp.add_rewordings(zip(positives, (e.subject for e in train)))
    if pseudo is not None:
        exp.add_seen([*pseudo.prompts, *pseudo.unrelated, *pseudo.filler, *pseudo.same_subject])
        exp.add_rewordings(zip(pseudo.paraphrases, pseudo.subjects or [None] * len(pseudo.paraphrases)))
    exp.add_rewordings(generator_texts)
    return exp


def build(loaded: lm.LoadedModel, edits: "list[EditRequest]", cfg: MegConfig,
          work_dir: Path | None = None, progress: bool = True, probes=None) -> EditedModel:
    """Fit, encode, route, generate: the whole MeG build for one edit set, in memory.

    ``probes`` (a ``meg.probes.Blocklist``) is what the evaluation will ask besides the edits' own first
    paraphrase and locality prompt; nothing of it, nor of the benchmarks' probes, is fitted, trained or
    calibrated on. The model's ``exposure`` records what was. The pipeline stages run the same steps one by
    one with files in between.
    """
    timings: dict[str, float] = {}
    t0 = time.time()
    data = build_data(loaded, edits, cfg, probes, progress)
    pool, bank = data.pool, data.bank
    timings["rewrite_seconds"] = time.time() - t0

    t0 = time.time()
    fitted = fit.fit_edits(loaded, edits, cfg.fit, store_dir=work_dir / "fit" if work_dir else None,
                           progress=progress, bank=bank)
    timings["fit_seconds"] = time.time() - t0

    t0 = time.time()
    encoder = encoder_for(cfg, pool, progress)
    timings["encoder_seconds"] = time.time() - t0

    t0 = time.time()
    pseudo = calibration_set(cfg, pool, bank) if cfg.router != "off" else None
    router, calibration = fit_router(cfg, encoder, edits, pseudo)
    timings["router_seconds"] = time.time() - t0

    t0 = time.time()
    source, generator_texts = sources.source_class(cfg).train(
        cfg, edits, fitted.weights, fitted.w0, encoder, bank, edit_emb=getattr(router, "edit_emb", None),
        ckpt_dir=_generator_ckpt_dir(cfg, edits, work_dir), progress=progress)
    timings["generator_seconds"] = time.time() - t0

    info = {
        "n_edits": len(edits),
        "fit": fitted.report(),
        "calibration": asdict(calibration) if calibration else None,
        "timings": timings,
        "edit_ids": [e.id for e in edits],
    }
    exposure = build_exposure(edits, cfg, data, fitted.contexts, pseudo, generator_texts)
    info["leaks"] = exposure.leaks(edits)
    info["n_pseudo_pool"] = len(pool)
    info["n_rewordings"] = sum(len(v) for v in data.rewordings.values())
    model = EditedModel(loaded, fitted.layer, cfg.fit.act, encoder, router, None, fitted.w0, cfg, info=info,
                        edit_targets=[e.target_new for e in edits], source=source)
    model.exposure = exposure
    return model


def bundle_lookup(cfg: MegConfig, weights: torch.Tensor, edits: "list[EditRequest]"):
    """(fitted weights, edit prompts) the bundle keeps: the weights for ``lookup`` or ``exact_prompts``, the
    prompts for ``exact_prompts``; None where not needed (``WeightSource.kept``)."""
    return sources.source_class(cfg).kept(cfg, weights, [e.prompt for e in edits])


def router_confusion(model: EditedModel, edits: "list[EditRequest]", bank=None) -> dict[str, float]:
    """Share of edit prompts, paraphrases and locality prompts routed (report only, never tuned on).

    With a template bank, also the share of questions about an edit's subject on another relation
    (which should not be routed) and of those routed that went to that edit.
    """
    out: dict[str, float] = {}
    groups = {
        "prompt": [(i, e.prompt) for i, e in enumerate(edits)],
        "paraphrase": [(i, e.paraphrases[0]) for i, e in enumerate(edits) if e.paraphrases],
        "locality": [(i, e.locality[0].prompt) for i, e in enumerate(edits) if e.locality],
    }
    if bank is not None:
        same = [(i, bank.other_relation(e.prompt, e.subject, i)) for i, e in enumerate(edits)]
        groups["same_subject"] = [(i, q) for i, q in same if q]
    for name, pairs in groups.items():
        if not pairs:
            continue
        own = torch.tensor([i for i, _ in pairs])
        _, mask, nearest, _ = model.route([q for _, q in pairs])
        out[f"router_{name}_routed"] = 100.0 * float(mask.float().mean())
        if name in ("prompt", "paraphrase"):
            out[f"router_{name}_right_edit"] = 100.0 * float((mask & (nearest == own)).float().mean())
    return out


def _generator_ckpt_dir(cfg: MegConfig, edits: "list[EditRequest]", work_dir: Path | None) -> Path | None:
    """Checkpoints of one generator run: its settings, the settings its conditions come from, and the edit set.

    Builds that differ only in other settings (the router's, say) share the directory and so resume
    one another's training; builds of other edit sets or encoders in the same work dir keep apart.
    """
    if work_dir is None:
        return None
    what = {"generator": cfg.generator, "encoder": cfg.encoder, "variants": cfg.generator_variants,
            "condition": cfg.generator_condition, "fit": asdict(cfg.fit), "edits": [e.content_key for e in edits]}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return Path(work_dir) / "generator" / key


def with_overrides(cfg: MegConfig, overrides: dict[str, object]) -> MegConfig:
    """A copy of ``cfg`` with dotted settings replaced: ``{"fit.layer": 28, "router_options.subject_gate": True}``.

    ``encoder.*``, ``generator.*`` and ``router_options.*`` set keys of those override dicts (checked
    by their own configs when used); ``fit.*`` sets FitConfig fields; other keys set MegConfig fields.
    """
    d = _config_dict(cfg)
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if head not in d:
            raise ConfigError(f"meg: unknown setting '{dotted}'")
        if rest:
            if not isinstance(d[head], dict):
                raise ConfigError(f"meg: '{head}' has no sub-settings (got '{dotted}')")
            if head == "fit" and rest not in d["fit"]:
                raise ConfigError(f"meg: unknown setting '{dotted}'")
            d[head][rest] = value
        else:
            d[head] = value
    return _config_from_dict(d)


def _config_dict(cfg: MegConfig) -> dict:
    return asdict(cfg)


def _config_from_dict(d: dict) -> MegConfig:
    d = dict(d)
    d.setdefault("exact_prompts", False)  # bundles from before the setting answered every question generated
    d.setdefault("weights", "generator")  # and were generator bundles
    d["fit"] = fit.FitConfig(**d["fit"])
    return MegConfig(**d)


def _versions() -> dict:
    import transformers

    import meg

    return {"meg": meg.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _hash_tree(root: Path, skip: set[str] = frozenset({"manifest.json"})) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = file_sha256(p)
    return out

