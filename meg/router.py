"""The router: does a query concern an edited fact? (paper, section 2 item 2)

Two routers share one interface on unit query embeddings (C = the encoder's width):

- ``FamiliarityRouter``, the paper's: a small network memorises a *random* label out of K for every
  edit embedding; near a memorised edit its output is confident. score = -entropy of the softmax,
  routed if entropy < threshold (the paper's eps; max entropy ln K).
- ``NearestEditRouter``: cosine similarity to the nearest edit embedding, routed if > threshold.

Both report the nearest edit (by cosine) for explanations and lookups.

The threshold is never tuned on the evaluated edit set. ``calibrate_router`` fits a fresh router of
the same kind on the same *number* of held-out pseudo-edits (CounterFact train prompts) and picks
the threshold that best separates those pseudo-edits' paraphrases from unrelated prompts;
``build_router`` then fits the real router on the edit prompts only and gives it that threshold.
Neither function has a parameter through which evaluation paraphrases or locality prompts could
enter.

Notation (paper -> code): K -> ``num_labels``, eps -> ``threshold`` of the familiarity router,
H -> ``entropy``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meg.errors import BundleError, ConfigError
from meg.subject_gate import SubjectIndex, mask_subject, question_start

ROUTERS = ("nearest", "familiarity")
NO_MATCH = -1e4  # score of a query the subject gate rejects: below every cosine and every -entropy
OBJECTIVES = ("harmonic", "balanced")
NEGATIVES = ("pooled", "per_kind")
RELATION_SCOPES = ("text", "sentence")
CONFIG_FILE, WEIGHTS_FILE = "router.json", "router.safetensors"


# Why a query was or was not routed (``Routing.reason``)
ROUTED = "routed"  # close enough to its nearest edit, and the relation check (when on) let it through
THRESHOLD = "threshold"  # not close enough to any edit
NO_SUBJECT = "no_subject"  # the subject gate: the query names no edited subject
RELATION = "relation"  # close enough, but it asks another fact of the edit's subject (the relation check)
EXACT = "exact"  # an edit's own prompt, routed to that edit whatever the scores (set by the edited model)


@dataclass
class Routing:
    """What the router decided for M queries."""

    mask: torch.Tensor  # (M,) bool: routed to an edit
    nearest: torch.Tensor  # (M,) the nearest edit's index
    confidence: torch.Tensor  # (M,) in [0, 1]
    reason: list[str]  # ROUTED, THRESHOLD, NO_SUBJECT or RELATION per query
    relation: torch.Tensor  # (M,) the relation check's cosine; NaN where it did not apply


@dataclass
class RouterConfig:
    kind: str = "nearest"  # "nearest" (cosine to the nearest edit) or "familiarity" (the paper's network)
    threshold: float | None = None  # familiarity: route if entropy < threshold; nearest: if cosine > threshold
    objective: str = "harmonic"  # calibration: harmonic or plain mean of paraphrase/edit recall and rejection
    # calibration: the rejection the objective weighs is over all negatives at once ("pooled"), or the mean of the
    # rejection of each kind ("per_kind": unrelated prompts; questions on a probed pseudo-edit's subject about
    # another relation), so the mix of kinds does not move with the edit count
    negatives: str = "per_kind"  # chosen on held-out pseudo-edits (docs/experiments/history.md §4.2)
    subject_gate: bool = False  # route a query only to edits whose subject it names (subjectless edits: embedding only)
    # After routing, a question that names its nearest edit's subject is compared with that edit's prompt, the
    # subject replaced by ``relation_word`` in both. If the two embeddings' cosine is below ``relation_cut``, the
    # question asks another fact of the subject and goes to the unedited model.
    relation_check: bool = False
    relation_word: str = "it"
    # what of a question the relation check compares: "text" (all of it) or "sentence" (from the sentence that
    # names the subject last on: a leading sentence of other context does not count against the relation)
    relation_scope: str = "text"
    # A question asked after other context ("Some context. Where was X born?") is embedded as a mix of the whole
    # text and the question alone (from the sentence that names an edit's subject last on), this much of the latter
    # (0: the whole text only). Questions without such context are embedded as they are.
    question_view: float = 0.0
    relation_cut: float | None = None  # null: calibrated together with the threshold
    chunk_size: int = 4096  # edit embeddings per similarity matmul (memory bound for large edit sets)
    num_labels: int = 10  # familiarity: K random labels
    blocks: int = 5  # familiarity: residual blocks Linear(C,4C)-GELU-Linear(4C,C)-Dropout
    dropout: float = 0.1  # familiarity: dropout in every block
    lr: float = 1e-3  # familiarity: AdamW learning rate
    batch_size: int = 256  # familiarity: edits per step
    max_epochs: int = 500  # familiarity: give up memorising after this many epochs
    scale_input: bool = True  # familiarity: feed sqrt(C) * embedding (unit-size coordinates; memorises ~10x faster)
    stop_loss: float = 0.01  # familiarity: memorised once every label is right and the epoch's mean loss is below
    seed: int = 0  # familiarity: labels, initialisation, batch order
    device: str = "cpu"  # familiarity: where the network trains and runs

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"router: bad value for '{name}': {getattr(self, name)!r} ({why})")

        if self.kind not in ROUTERS:
            raise bad("kind", " | ".join(ROUTERS))
        if not isinstance(self.subject_gate, bool):
            raise bad("subject_gate", "true or false")
        if self.objective not in OBJECTIVES:
            raise bad("objective", " | ".join(OBJECTIVES))
        if self.negatives not in NEGATIVES:
            raise bad("negatives", " | ".join(NEGATIVES))
        for name in ("threshold", "relation_cut"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value)):
                raise bad(name, "a number or null (not calibrated)")
        if not isinstance(self.relation_check, bool):
            raise bad("relation_check", "true or false")
        if not isinstance(self.relation_word, str) or not self.relation_word.strip():
            raise bad("relation_word", "a non-empty word")
        if not _is_number(self.question_view) or not 0 <= self.question_view <= 1:
            raise bad("question_view", "in [0, 1]")
        if self.relation_scope not in RELATION_SCOPES:
            raise bad("relation_scope", " | ".join(RELATION_SCOPES))
        for name in ("chunk_size", "num_labels", "blocks", "batch_size", "max_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.num_labels < 2:
            raise bad("num_labels", "at least 2 labels")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise bad("dropout", "in [0, 1)")
        for name in ("lr", "stop_loss"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise bad(name, "a positive number")
        if not isinstance(self.seed, int):
            raise bad("seed", "an integer")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise bad("device", str(e)) from e


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def nearest_cosine(
    queries: torch.Tensor, keys: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) x (N, C) unit vectors -> (max cosine (M,), index of the nearest key (M,)), N in chunks."""
    best = torch.full((queries.shape[0],), -math.inf)
    arg = torch.zeros(queries.shape[0], dtype=torch.long)
    for s in range(0, keys.shape[0], chunk_size):
        sims = queries @ keys[s : s + chunk_size].T  # (M, chunk)
        value, index = sims.max(1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + s, arg)
    return best, arg


class Router:
    """Common part: the edit embeddings, routing by threshold, calibration, confusion, persistence."""

    kind = ""

    def __init__(self, config: RouterConfig | None = None):
        self.config = config or RouterConfig(kind=self.kind)
        if self.config.kind != self.kind:
            raise ConfigError(f"router: config of kind {self.config.kind!r} given to a {self.kind!r} router")
        self.edit_emb: torch.Tensor | None = None  # (N, C) unit vectors of the edit prompts
        self.subjects: list[str | None] | None = None  # subject of every edit, when known
        self._gate: SubjectIndex | None = None  # built from the subjects when config.subject_gate
        self._names: SubjectIndex | None = None  # every subject, for question_view
        # relation_check: (N, C) unit embeddings of the edit prompts with their subject masked (zero rows: the
        # prompt does not name its subject, so the check does not apply to that edit)
        self.masked_emb: torch.Tensor | None = None

    # -- to implement: score, and the map between score and threshold units --

    def score(self, query_emb: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M,) familiarity; higher = more likely an edited fact."""
        raise NotImplementedError

    def _score_cut(self, threshold: float) -> float:
        return threshold

    def _threshold_of(self, cut: float) -> float:
        return cut

    def _fit(self, edit_emb: torch.Tensor) -> None:
        pass

    # -- shared --

    @property
    def n_edits(self) -> int:
        return 0 if self.edit_emb is None else int(self.edit_emb.shape[0])

    def fit(self, edit_emb: torch.Tensor, subjects: Sequence[str | None] | None = None,
            prompts: Sequence[str] | None = None, encode: Callable[[list[str]], torch.Tensor] | None = None
            ) -> "Router":
        """Fit on the (N, C) embeddings of the edit prompts (and nothing else) and their subjects.

        ``relation_check`` also needs the prompts themselves and the encoder, to embed them with their
        subject masked."""
        if edit_emb.ndim != 2 or edit_emb.shape[0] < 1:
            raise ValueError(f"router.fit: expected (N, C) edit embeddings with N >= 1, got {tuple(edit_emb.shape)}")
        if subjects is not None and len(subjects) != edit_emb.shape[0]:
            raise ValueError(f"router.fit: {len(subjects)} subjects for {edit_emb.shape[0]} edits")
        if self.config.subject_gate and subjects is None:
            raise ConfigError("router: 'subject_gate' needs the subject of every edit (None where unknown)")
        if self.config.relation_check and (subjects is None or prompts is None or encode is None):
            raise ConfigError("router: 'relation_check' needs the edit prompts, their subjects and the encoder")
        if prompts is not None and len(prompts) != edit_emb.shape[0]:
            raise ValueError(f"router.fit: {len(prompts)} prompts for {edit_emb.shape[0]} edits")
        self.edit_emb = F.normalize(edit_emb.detach().float().cpu(), dim=-1)
        self._set_subjects(subjects)
        self.masked_emb = self._masked_prompts(list(prompts), encode) if self.config.relation_check else None
        self._fit(self.edit_emb)
        return self

    def _masked_prompts(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        masked = [self._mask(p, s) for p, s in zip(prompts, self.subjects)]
        out = torch.zeros_like(self.edit_emb)
        rows = [i for i, m in enumerate(masked) if m]
        if rows:
            out[rows] = F.normalize(encode([masked[i] for i in rows]).detach().float().cpu(), dim=-1)
        return out

    def _mask(self, text: str, subject: str | None) -> str | None:
        return mask_subject(text, subject, self.config.relation_word, self.config.relation_scope == "sentence")

    def _set_subjects(self, subjects: Sequence[str | None] | None) -> None:
        self.subjects = list(subjects) if subjects is not None else None
        self._names = SubjectIndex(self.subjects) if self.subjects is not None else None
        self._gate = self._names if self.config.subject_gate else None

    def question_views(self, texts: Sequence[str]) -> list[str | None]:
        """Per query, its question without the context before it (from the sentence that names an edit's
        subject last on), or None when nothing comes before that sentence or it names no edit's subject."""
        if self._names is None:
            return [None] * len(texts)
        out: list[str | None] = []
        for text in texts:
            named = {self.subjects[j] for j in self._names.matches(text)}  # edits on one subject: looked up once
            starts = [question_start(text, subject) for subject in named]
            start = max((s for s in starts if s is not None), default=0)
            out.append(text[start:] if start > 0 and text[start:].strip() else None)
        return out

    def query_embeddings(self, query_emb: torch.Tensor, texts: Sequence[str] | None,
                         encode: Callable[[list[str]], torch.Tensor] | None) -> torch.Tensor:
        """``query_emb`` with ``question_view`` applied: a question asked after other context embedded as the mix
        of the whole text and the question alone. Unchanged when the option is off or texts / encode are missing."""
        w = float(self.config.question_view)
        if not w or texts is None or encode is None or len(texts) != query_emb.shape[0]:
            return query_emb
        views = self.question_views(texts)
        rows = [i for i, v in enumerate(views) if v is not None]
        if not rows:
            return query_emb
        out = F.normalize(query_emb.detach().float().cpu(), dim=-1).clone()
        q = F.normalize(encode([views[i] for i in rows]).detach().float().cpu(), dim=-1)
        out[rows] = F.normalize((1 - w) * out[rows] + w * q, dim=-1)
        return out

    def _check_fitted(self) -> torch.Tensor:
        if self.edit_emb is None:
            raise ConfigError(f"router ({self.kind}): not fitted; call fit(edit embeddings) first")
        return self.edit_emb

    def nearest(self, query_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max cosine, nearest edit index) of every query."""
        q = F.normalize(query_emb.detach().float().cpu(), dim=-1)
        return nearest_cosine(q, self._check_fitted(), self.config.chunk_size)

    def route(
        self, query_emb: torch.Tensor, texts: Sequence[str] | None = None,
        encode: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask (M,) bool: routed to an edit, nearest edit index (M,), confidence (M,) in [0, 1]).

        ``texts`` are the queries themselves, needed by the subject gate and the relation check; the
        relation check also needs ``encode``, the query encoder (it embeds the masked questions).
        """
        r = self.route_detail(query_emb, texts, encode)
        return r.mask, r.nearest, r.confidence

    def route_detail(
        self, query_emb: torch.Tensor, texts: Sequence[str] | None = None,
        encode: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> "Routing":
        """``route``, with why each query was or was not routed (``Routing.reason``) and its relation cosine."""
        if self.config.threshold is None:
            raise ConfigError(f"router ({self.kind}): no threshold; calibrate it (calibrate_router) or set one")
        score, nearest = self.scores(self.query_embeddings(query_emb, texts, encode), texts)
        # in float64, as the cuts were chosen (a float32 comparison would round a cut just below a score onto it)
        passed = score.double() > self._score_cut(self.config.threshold)
        mask = passed.clone()
        relation = torch.full((nearest.shape[0],), float("nan"))
        if self.config.relation_check:
            if self.config.relation_cut is None:
                raise ConfigError(f"router ({self.kind}): no relation_cut; calibrate it (calibrate_router) or set one")
            relation = self.relation_cosines(texts, nearest, passed, encode)
            mask &= ~(relation.double() < self.config.relation_cut)
        reason = [ROUTED if m else RELATION if p else NO_SUBJECT if s == NO_MATCH else THRESHOLD
                  for m, p, s in zip(mask.tolist(), passed.tolist(), score.tolist())]
        return Routing(mask, nearest, self._confidence(score), reason, relation)

    def relation_cosines(self, texts: Sequence[str] | None, nearest: torch.Tensor, active: torch.Tensor,
                         encode: Callable[[list[str]], torch.Tensor] | None) -> torch.Tensor:
        """(M,) cosine of each active question and its nearest edit's prompt, the subject masked in both;
        NaN where the check does not apply (inactive, or either text does not name that edit's subject)."""
        if self.masked_emb is None:
            raise ConfigError(f"router ({self.kind}): fitted without 'relation_check'")
        if texts is None or len(texts) != nearest.shape[0] or encode is None:
            raise ConfigError("router: 'relation_check' needs the text of every query and the encoder")
        out = torch.full((nearest.shape[0],), float("nan"))
        rows = active.nonzero().flatten()
        named = self.masked_emb[nearest[rows]].any(1).tolist()  # the edit's prompt names its subject
        pairs = [(m, j, q) for m, j, ok in zip(rows.tolist(), nearest[rows].tolist(), named)
                 if ok and (q := self._mask(texts[m], self.subjects[j]))]
        if pairs:
            q = F.normalize(encode([q for _, _, q in pairs]).detach().float().cpu(), dim=-1)
            rows = torch.tensor([m for m, _, _ in pairs])
            out[rows] = (q * self.masked_emb[torch.tensor([j for _, j, _ in pairs])]).sum(1)
        return out

    def _score_and_nearest(self, query_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(query_emb), self.nearest(query_emb)[1]

    def scores(self, query_emb: torch.Tensor, texts: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (M,), nearest edit (M,)), after the subject gate when it is on.

        With the gate, the nearest edit is the most similar among the edits the query names (and
        the subjectless ones); a query that names none scores ``NO_MATCH`` and is never routed.
        """
        score, nearest = self._score_and_nearest(query_emb)
        if self._gate is None:
            return score, nearest
        if texts is None or len(texts) != query_emb.shape[0]:
            raise ConfigError("router: the subject gate needs the text of every query")
        q = F.normalize(query_emb.detach().float().cpu(), dim=-1)
        emb = self._check_fitted()
        best = torch.full((q.shape[0],), -math.inf)
        arg = nearest.clone()
        if self._gate.free:
            free = torch.tensor(self._gate.free)
            best, local = nearest_cosine(q, emb[free], self.config.chunk_size)
            arg = free[local]
        for m, text in enumerate(texts):
            cands = self._gate.matches(text)
            if cands:
                sims = emb[cands] @ q[m]  # (K,)
                j = int(sims.argmax())
                if sims[j] > best[m]:
                    best[m], arg[m] = sims[j], cands[j]
        named = best > -math.inf
        return self._gated_score(score, best, named), torch.where(named, arg, nearest)

    def _gated_score(self, score: torch.Tensor, best_cos: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        return torch.where(named, score, torch.full_like(score, NO_MATCH))

    def _confidence(self, score: torch.Tensor) -> torch.Tensor:
        return score.clamp(0.0, 1.0)

    def calibrate(
        self,
        positive_emb: torch.Tensor,
        negative_emb: torch.Tensor,
        target_recall: float | None = None,
        edit_emb: torch.Tensor | None = None,
        positive_texts: Sequence[str] | None = None,
        negative_texts: Sequence[str] | None = None,
        edit_texts: Sequence[str] | None = None,
        encode: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> dict:
        """Set the threshold from queries that should route (positives) and should not (negatives).

        positive_emb: paraphrases of the fitted edits; negative_emb: unrelated prompts, or a list of kinds of
        them (the rejection is then the mean over kinds, ``negative_texts`` a list too); edit_emb
        (optional): the fitted edit prompts, which must keep routing too; the texts go with them
        (the subject gate and the relation check need them, the check also ``encode``). The cut
        maximises the configured objective (see ``choose_cut``); with ``relation_check`` the threshold
        and the relation cut are chosen together (``choose_cuts``). Returns what was chosen.
        """
        if isinstance(negative_emb, torch.Tensor):  # one kind
            negative_emb, negative_texts = [negative_emb], [negative_texts]
        neg_texts = negative_texts or [None] * len(negative_emb)

        def group(emb: torch.Tensor, texts: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
            """(scores, masked cosines with the nearest edit, or None without the check) of one group."""
            score, nearest = self.scores(self.query_embeddings(emb, texts, encode), texts)
            if not self.config.relation_check:
                return score, None
            return score, self.relation_cosines(texts, nearest, torch.ones_like(nearest, dtype=torch.bool), encode)

        pos = group(positive_emb, positive_texts)
        neg = [group(e, t) for e, t in zip(negative_emb, neg_texts) if len(e)]
        edit = group(edit_emb, edit_texts) if edit_emb is not None else None
        relation_cut = None
        if self.config.relation_check:
            cut, relation_cut, recall, rejection, edit_recall = choose_cuts(pos, neg, self.config.objective,
                                                                            target_recall, edit)
            self.config.relation_cut = relation_cut
        else:
            cut, recall, rejection, edit_recall = choose_cut(pos[0], [n[0] for n in neg], self.config.objective,
                                                             target_recall, edit[0] if edit else None)
        self.config.threshold = self._threshold_of(cut)
        n_negative = sum(int(n[0].numel()) for n in neg)
        return {"threshold": self.config.threshold, "relation_cut": relation_cut, "recall": recall,
                "rejection": rejection, "edit_recall": edit_recall, "n_positive": int(pos[0].numel()),
                "n_negative": n_negative}

    def confusion(
        self,
        edit_query_emb: torch.Tensor,
        paraphrase_emb: torch.Tensor,
        unrelated_emb: torch.Tensor,
        paraphrase_of: torch.Tensor | None = None,
        texts: dict[str, Sequence[str]] | None = None,
        encode: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Share routed of edit prompts, paraphrases and unrelated prompts (0-1).

        paraphrase_of (P,) gives the edit index each paraphrase rephrases; then also the share of
        paraphrases routed *and* nearest to their own edit. ``texts`` maps "edit", "paraphrase" and
        "unrelated" to the query texts (for the subject gate and, with ``encode``, the relation check).
        """
        texts = texts or {}
        out = {}
        for name, emb in (("edit", edit_query_emb), ("paraphrase", paraphrase_emb), ("unrelated", unrelated_emb)):
            if not len(emb):
                out[f"{name}_routed"] = float("nan")
                continue
            mask, nearest, _ = self.route(emb, texts.get(name), encode)
            out[f"{name}_routed"] = float(mask.float().mean())
            if name == "paraphrase" and paraphrase_of is not None:
                out["paraphrase_routed_right"] = float((mask & (nearest == paraphrase_of.cpu())).float().mean())
        return out

    # -- persistence --

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"edit_emb": self._check_fitted().contiguous(), **self._tensors()}
        if self.masked_emb is not None:
            tensors["masked_emb"] = self.masked_emb.contiguous()
        save_file(tensors, str(out / WEIGHTS_FILE))
        meta = {"config": asdict(self.config), "n_edits": self.n_edits, "subjects": self.subjects}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return out


def load_router(in_dir: str | Path, device: str | None = None) -> Router:
    """A saved router of either kind."""
    from safetensors.torch import load_file

    src = Path(in_dir)
    try:
        meta = json.loads((src / CONFIG_FILE).read_text())
        tensors = load_file(str(src / WEIGHTS_FILE))
        config = RouterConfig(**meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{src}: not a saved router ({e})") from e
    if device is not None:
        config.device = device
    router = make_router(config)
    router.edit_emb = tensors.pop("edit_emb")
    if router.n_edits != meta.get("n_edits"):
        raise BundleError(f"{src}: holds {router.n_edits} edit embeddings, {CONFIG_FILE} says {meta.get('n_edits')}")
    subjects = meta.get("subjects")
    if (subjects is not None and len(subjects) != router.n_edits) or (config.subject_gate and subjects is None):
        raise BundleError(f"{src}: {CONFIG_FILE} does not list a subject for every edit")
    router._set_subjects(subjects)
    router.masked_emb = tensors.pop("masked_emb", None)
    if config.relation_check and (router.masked_emb is None or router.masked_emb.shape != router.edit_emb.shape
                                  or subjects is None):
        raise BundleError(f"{src}: 'relation_check' is on but {WEIGHTS_FILE} has no masked prompt embedding per edit "
                          f"or {CONFIG_FILE} no subjects")
    router._load_tensors(tensors)
    return router


def make_router(config: RouterConfig) -> Router:
    return {"nearest": NearestEditRouter, "familiarity": FamiliarityRouter}[config.kind](config)


# ---- the two routers --------------------------------------------------------------------------


class NearestEditRouter(Router):
    """Routed if the cosine to the nearest edit embedding exceeds the threshold."""

    kind = "nearest"

    def score(self, query_emb: torch.Tensor) -> torch.Tensor:
        return self.nearest(query_emb)[0]

    def _score_and_nearest(self, query_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nearest(query_emb)  # one pass: the score is the nearest cosine

    def _gated_score(self, score: torch.Tensor, best_cos: torch.Tensor, named: torch.Tensor) -> torch.Tensor:
        return torch.where(named, best_cos, torch.full_like(score, NO_MATCH))  # cosine to the nearest named edit


class FamiliarityNet(nn.Module):
    """Residual MLP (blocks x [Linear(C,4C)-GELU-Linear(4C,C)-Dropout]) then Linear(C,K)."""

    def __init__(self, dim: int, num_labels: int, blocks: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
            for _ in range(blocks)
        )
        self.head = nn.Linear(dim, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B, K) logits
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B,) entropy of the softmax in nats."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def first_duplicate(emb: torch.Tensor, min_cos: float = 1 - 1e-5, chunk_size: int = 2048) -> torch.Tensor:
    """(N, C) unit vectors -> (N,) index of the first row equal to each row (itself if none earlier)."""
    out = torch.empty(emb.shape[0], dtype=torch.long)
    for s in range(0, emb.shape[0], chunk_size):
        same = emb[s : s + chunk_size] @ emb.T > min_cos  # (chunk, N); true at least on the diagonal
        out[s : s + chunk_size] = same.float().argmax(1)  # first true column
    return out


class FamiliarityRouter(Router):
    """The paper's router: memorise random labels of the edits; familiar = low output entropy."""

    kind = "familiarity"

    def __init__(self, config: RouterConfig | None = None):
        super().__init__(config)
        self.net: FamiliarityNet | None = None
        self.labels: torch.Tensor | None = None  # (N,) the random label of every edit
        self.history: list[float] = []  # mean training loss per epoch

    def _score_cut(self, threshold: float) -> float:
        return -threshold  # entropy < eps  <=>  -entropy > -eps

    def _threshold_of(self, cut: float) -> float:
        return -cut

    def _confidence(self, score: torch.Tensor) -> torch.Tensor:
        return (1.0 + score / math.log(self.config.num_labels)).clamp(0.0, 1.0)  # 1 - H / ln K

    def _new_net(self, dim: int) -> FamiliarityNet:
        cfg = self.config
        return FamiliarityNet(dim, cfg.num_labels, cfg.blocks, cfg.dropout).to(cfg.device)

    def _fit(self, edit_emb: torch.Tensor) -> None:
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        # the same prompt twice (equal embeddings up to rounding) gets one label, or it could never be memorised
        self.labels = torch.randint(cfg.num_labels, (edit_emb.shape[0],), generator=g)[first_duplicate(edit_emb)]
        torch.manual_seed(cfg.seed)  # initialisation and dropout
        self.net = self._new_net(edit_emb.shape[1])
        x, y = self._inputs(edit_emb), self.labels.to(cfg.device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr)
        self.history = []
        self.net.train()
        for _ in range(cfg.max_epochs):
            total, right = 0.0, 0
            for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
                opt.zero_grad(set_to_none=True)
                logits = self.net(x[idx])
                loss = F.cross_entropy(logits, y[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                right += int((logits.argmax(-1) == y[idx]).sum())
            self.history.append(total / len(x))
            if right == len(x) and self.history[-1] < cfg.stop_loss and self._memorised(x, y):
                break
        self.net.eval()

    def _inputs(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (M, C) -> network inputs on the device."""
        x = emb.to(self.config.device)
        return x * math.sqrt(x.shape[-1]) if self.config.scale_input else x

    def _logits(self, emb: torch.Tensor, inputs: bool = False) -> torch.Tensor:
        """(M, C) unit embeddings (or network inputs) -> (M, K), eval mode, chunked, no gradients."""
        x = emb if inputs else self._inputs(emb)
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                return torch.cat([self.net(c) for c in x.split(self.config.chunk_size)])
        finally:
            self.net.train(was_training)

    def _memorised(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Every label right and the mean loss below stop_loss, in eval mode (x: network inputs)."""
        logits = self._logits(x, inputs=True)
        return bool((logits.argmax(-1) == y).all()) and float(F.cross_entropy(logits, y)) < self.config.stop_loss

    def score(self, query_emb: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        if not len(query_emb):
            return torch.zeros(0)
        return -entropy(self._logits(F.normalize(query_emb.detach().float(), dim=-1))).cpu()

    @property
    def memorised(self) -> bool:
        """Whether every edit gets its own label back (eval mode)."""
        return bool((self._logits(self._check_fitted()).argmax(-1).cpu() == self.labels).all())

    def _tensors(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        return {**state, "labels": self.labels}

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.labels = tensors.pop("labels")
        self.net = self._new_net(self.edit_emb.shape[1])
        self.net.load_state_dict({k.removeprefix("net."): v for k, v in tensors.items()})
        self.net.eval()


# ---- threshold choice -------------------------------------------------------------------------


def choose_cut(
    pos: torch.Tensor,
    neg: "torch.Tensor | Sequence[torch.Tensor]",
    objective: str = "harmonic",
    target_recall: float | None = None,
    edit: torch.Tensor | None = None,
) -> tuple[float, float, float, float]:
    """The score cut (routed iff score > cut) separating positive from negative scores.

    pos: scores of paraphrases (should route), neg: of unrelated prompts (should not), or a list of kinds of
    negatives whose rejections count alike (the rejection is their mean), edit
    (optional): of the fitted edit prompts themselves (should route). The objective combines
    paraphrase recall, rejection and (if given) edit recall, as the editing Score combines
    generality, locality and reliability. With target_recall: the strictest cut that still routes
    that share of the paraphrases. Candidate cuts lie midway between consecutive distinct scores;
    among equally good ones the middle one is taken. Returns (cut, recall, rejection, edit recall).
    """
    kinds = [n.double().flatten() for n in ([neg] if isinstance(neg, torch.Tensor) else neg) if n.numel()]
    if pos.numel() == 0 or not kinds:
        raise ValueError("calibration needs at least one positive and one negative score")
    edit_scores = edit.double().flatten() if edit is not None and edit.numel() else None
    groups = [pos.double().flatten(), *kinds] + ([edit_scores] if edit_scores is not None else [])
    values = torch.cat(groups).unique()  # sorted
    cuts = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0])

    def share_above(scores: torch.Tensor) -> torch.Tensor:
        return 1 - torch.searchsorted(scores.sort().values, cuts, right=True) / scores.numel()

    recall = share_above(groups[0])
    rejection = 1 - torch.stack([share_above(n) for n in kinds]).mean(0)
    edit_recall = share_above(edit_scores) if edit_scores is not None else torch.ones_like(recall)
    value = objective_value(recall, rejection, edit_recall, objective, target_recall)
    best = (value >= value.max() - 1e-12).nonzero().flatten()
    i = int(best[len(best) // 2])
    return float(cuts[i]), float(recall[i]), float(rejection[i]), float(edit_recall[i])


def objective_value(recall: torch.Tensor, rejection: torch.Tensor, edit_recall: torch.Tensor, objective: str,
                    target_recall: float | None = None) -> torch.Tensor:
    """What a cut is chosen by: the harmonic or plain mean of the three shares, or with ``target_recall`` the
    rejection of the cuts that keep that recall (-1 for the others)."""
    if target_recall is not None:
        if not 0 < target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
        return torch.where(recall >= target_recall - 1e-12, rejection, torch.full_like(recall, -1.0))
    parts = torch.stack([recall, rejection, edit_recall])
    if objective == "balanced":
        return parts.mean(0)
    return 3 / (1 / parts.clamp(min=1e-12)).sum(0)


RELATION_OUT, RELATION_IN = -2.0, 2.0  # relation-check scores: not routed; routed, and the check does not apply


def relation_scores(score: torch.Tensor, cosine: torch.Tensor, cut: float) -> torch.Tensor:
    """What the relation check sees of each question at score cut ``cut``: below every cosine if it is not
    routed, its subject-masked cosine if the check applies, above every cosine if it does not (NaN)."""
    routed = score.double() > cut
    out = torch.full(routed.shape, RELATION_OUT, dtype=torch.double)
    return torch.where(routed, torch.nan_to_num(cosine.double(), nan=RELATION_IN), out)


def choose_cuts(
    pos: tuple[torch.Tensor, torch.Tensor],
    neg: Sequence[tuple[torch.Tensor, torch.Tensor]],
    objective: str = "harmonic",
    target_recall: float | None = None,
    edit: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_candidates: int = 256,
) -> tuple[float, float, float, float, float]:
    """The score cut and the relation cut of a router with the relation check, chosen together.

    Each group is (router scores, subject-masked cosines with the nearest edit, NaN where the check does
    not apply), as in ``choose_cut``: paraphrases, kinds of negatives, edit prompts. The check lets a
    looser score cut pay: it sends back some of what the looser cut lets through. Tried: the cut
    ``choose_cut`` picks without the check, and looser cuts, each just below a paraphrase score under
    it (at most ``max_candidates``, evenly spread), each with the relation cut that is best for it
    (``choose_cut`` on ``relation_scores``). The best pair is kept; on a tie, the stricter score cut.
    Returns (score cut, relation cut, recall, rejection, edit recall) after both.
    """
    first = choose_cut(pos[0], [n[0] for n in neg], objective, target_recall, edit[0] if edit else None)[0]
    below = pos[0].double().unique()
    below = below[(below <= first) & (below > NO_MATCH)].flip(0)  # descending: the loosest last; never gate-rejected
    if below.numel() > max_candidates:
        below = below[torch.linspace(0, below.numel() - 1, max_candidates).round().long()]
    best, out = -math.inf, None
    for cut in [first, *(float(b) - 1e-9 for b in below)]:
        got = choose_cut(relation_scores(*pos, cut), [relation_scores(*n, cut) for n in neg], objective, target_recall,
                         relation_scores(*edit, cut) if edit else None)
        if got[0] >= RELATION_IN:  # "send back everything", which routing cannot do (unchecked questions stay)
            continue
        value = float(objective_value(*(torch.tensor([v]) for v in got[1:]), objective, target_recall))
        if value > best + 1e-12:
            best, out = value, (cut, *got)
    return out


# ---- calibration on held-out pseudo-edits -----------------------------------------------------


@dataclass(frozen=True)
class PseudoEdits:
    """Facts that are *not* being edited, to calibrate the router threshold on (train split).

    prompts[i] is a pseudo-edit prompt and paraphrases[i] one of its paraphrases (the positives);
    unrelated are prompts of none of them (the negatives; e.g. same-relation prompts about other
    subjects); same_subject are negatives that name a pseudo-edit's subject but ask about another
    relation (a query the edit must not answer), same_subject_of the index of that pseudo-edit in
    prompts (empty: unknown; every same_subject question then counts). filler prompts only pad the fitted set up
    to the real edit count (their paraphrases are not probed, e.g. because the encoder was trained
    on them). subjects / filler_subjects give the subject of each prompt / filler prompt (empty:
    unknown).
    """

    prompts: tuple[str, ...]
    paraphrases: tuple[str, ...]
    unrelated: tuple[str, ...]
    filler: tuple[str, ...] = field(default=())
    subjects: tuple[str | None, ...] = field(default=())
    filler_subjects: tuple[str | None, ...] = field(default=())
    same_subject: tuple[str, ...] = field(default=())
    same_subject_of: tuple[int, ...] = field(default=())  # per same_subject question, its pseudo-edit (empty: unknown)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.paraphrases):
            raise ConfigError("pseudo-edits: one paraphrase per prompt expected")
        if not self.prompts or not self.unrelated:
            raise ConfigError("pseudo-edits: need at least one prompt with a paraphrase and one unrelated prompt")
        if self.subjects and len(self.subjects) != len(self.prompts):
            raise ConfigError("pseudo-edits: one subject per prompt expected")
        if self.filler_subjects and len(self.filler_subjects) != len(self.filler):
            raise ConfigError("pseudo-edits: one subject per filler prompt expected")
        if self.same_subject_of and (len(self.same_subject_of) != len(self.same_subject)
                                     or not all(0 <= i < len(self.prompts) for i in self.same_subject_of)):
            raise ConfigError("pseudo-edits: one pseudo-edit index (into prompts) per same-subject question expected")

    def texts(self) -> set[str]:
        return (set(self.prompts) | set(self.paraphrases) | set(self.unrelated) | set(self.filler)
                | set(self.same_subject))

    def fitted(self, n_edits: int) -> tuple[list[str], list[str | None] | None, int]:
        """(prompts, their subjects or None, how many are probed) of a pseudo edit set of n_edits, or of all
        the pseudo prompts there are when they are fewer (with a warning)."""
        n_probe = min(n_edits, len(self.prompts))
        prompts = list(self.prompts[:n_probe]) + list(self.filler[: n_edits - n_probe])
        if len(prompts) < n_edits:  # the calibration's edit set is smaller than the real one: say so
            warnings.warn(f"pseudo-edits: {len(prompts)} prompts, fewer than the {n_edits} edits; the router is "
                          f"calibrated on an edit set of {len(prompts)}")
        subjects = None
        if self.subjects and (self.filler_subjects or len(prompts) == n_probe):
            subjects = list(self.subjects[:n_probe]) + list(self.filler_subjects[: n_edits - n_probe])
        return prompts, subjects, n_probe


@dataclass
class Calibration:
    """What calibrate_router chose and how it did on the pseudo-edits."""

    threshold: float
    n_edits: int  # pseudo-edits fitted: the real edit count, or all the pseudo prompts there are when fewer
    n_probed: int  # of them, how many had their paraphrase probed
    n_unrelated: int  # negatives: unrelated prompts plus same-subject prompts of other relations
    recall: float  # pseudo-edit paraphrases routed
    rejection: float  # negatives not routed
    edit_recall: float  # pseudo-edit prompts themselves routed
    confusion: dict = field(default_factory=dict)
    relation_cut: float | None = None  # relation_check: the masked cosine below which a routed question goes back


def calibrate_router(
    config: RouterConfig,
    encode: Callable[[list[str]], torch.Tensor],
    pseudo: PseudoEdits,
    n_edits: int,
    exclude: Sequence[str] = (),
    target_recall: float | None = None,
) -> Calibration:
    """Choose the threshold of a router of this config for an edit set of n_edits facts.

    A fresh router is fitted on n_edits pseudo-edit prompts (probed ones first, then filler), and
    its threshold is chosen to separate the probed pseudo-edits' paraphrases from the negatives
    (unrelated prompts and same-subject prompts of other relations; ``config.negatives`` says how
    the two kinds are weighed). ``exclude`` (the real edit
    prompts) guards against a pseudo-edit set that overlaps the edit set. Evaluation paraphrases and
    locality prompts have no way in.
    """
    overlap = pseudo.texts() & set(exclude)
    if overlap:
        raise ConfigError(f"pseudo-edits overlap the edit set ({len(overlap)} texts, e.g. {sorted(overlap)[0]!r})")
    fitted, subjects, n_probe = pseudo.fitted(n_edits)
    for option in ("subject_gate", "relation_check"):
        if getattr(config, option) and subjects is None:
            raise ConfigError(f"router: '{option}' calibration needs pseudo-edits with subjects")
    fitted_set = set(fitted)
    unrelated = [u for u in dict.fromkeys(pseudo.unrelated) if u not in fitted_set]
    same = pseudo.same_subject
    if config.negatives == "per_kind" and pseudo.same_subject_of:
        # only subjects that are in the fitted set make a hard negative; the others' share would grow as the
        # edit count falls below the probed pseudo-edits
        same = [q for q, i in zip(same, pseudo.same_subject_of) if i < n_probe]
    same = [u for u in dict.fromkeys(same) if u not in fitted_set]
    negatives = unrelated + same
    router = make_router(replace(config, threshold=None, relation_cut=None))
    router.fit(encode(fitted), subjects, fitted, encode)
    paras = list(pseudo.paraphrases[:n_probe])
    para, probed = encode(paras), encode(fitted[:n_probe])
    if config.negatives == "per_kind":
        kinds = [k for k in (unrelated, same) if k]
        neg, neg_texts = [encode(k) for k in kinds], kinds
    else:
        neg, neg_texts = encode(negatives), negatives
    chosen = router.calibrate(para, neg, target_recall, edit_emb=probed, positive_texts=paras,
                              negative_texts=neg_texts, edit_texts=fitted[:n_probe], encode=encode)
    confusion = router.confusion(probed, para, encode(unrelated), torch.arange(n_probe),
                                 texts={"edit": fitted[:n_probe], "paraphrase": paras, "unrelated": unrelated},
                                 encode=encode)
    if same:
        confusion["same_subject_routed"] = float(router.route(encode(same), same, encode)[0].float().mean())
    return Calibration(chosen["threshold"], len(fitted), n_probe, len(negatives), chosen["recall"], chosen["rejection"],
                       chosen["edit_recall"], confusion, chosen["relation_cut"])


def memoised(encode: Callable[[list[str]], torch.Tensor]) -> Callable[[list[str]], torch.Tensor]:
    """``encode`` that embeds each distinct text once however often it is asked for (calibration asks for the
    probed prompts, the unrelated and the same-subject prompts twice each)."""
    seen: dict[str, torch.Tensor] = {}

    def enc(texts: list[str]) -> torch.Tensor:
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in seen]
        if todo:
            seen.update(zip(todo, encode(todo)))
        return torch.stack([seen[t] for t in texts]) if texts else encode([])

    return enc


def build_router(
    config: RouterConfig,
    encode: Callable[[list[str]], torch.Tensor],
    edit_prompts: Sequence[str],
    pseudo: PseudoEdits | None = None,
    edit_subjects: Sequence[str | None] | None = None,
) -> tuple[Router, Calibration | None]:
    """Fit a router on the edit prompts; threshold (and relation cut) from ``calibrate_router`` unless config
    sets them."""
    encode = memoised(encode)
    calibration = None
    if config.relation_check and (config.threshold is None) != (config.relation_cut is None):
        raise ConfigError("router: one of 'threshold' and 'relation_cut' is set; set both, or neither to calibrate "
                          "them together")
    if config.threshold is None:
        if pseudo is None:
            raise ConfigError("router: no threshold set and no pseudo-edits to calibrate it on")
        calibration = calibrate_router(config, encode, pseudo, len(edit_prompts), exclude=edit_prompts)
        config = replace(config, threshold=calibration.threshold, relation_cut=calibration.relation_cut)
    router = make_router(replace(config)).fit(encode(list(edit_prompts)), edit_subjects, list(edit_prompts), encode)
    return router, calibration
