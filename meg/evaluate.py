"""Evaluation harness: the editor interface and the metrics of knowledge editing.

Protocol (every number says which one it uses):

- **TF** (teacher-forced): prompt + target[:i] is fed for each target token i; a token counts when
  the argmax is target token i; averaged over tokens, then over items.
- **AG** (autoregressive generation): greedy decoding of up to 20 new tokens, cut at the first
  newline, a trailing '.' stripped, case-insensitive exact match with the target. A row stops
  generating once its outcome is decided (a newline, or text that can no longer match), which
  leaves the metric unchanged and saves most of the decoding.
- **Reliability** uses the edit prompt, **Generality** the first paraphrase, **Locality** the first
  locality prompt of each edit. The locality label is the *pre-edit* model's own greedy answer
  (AG: its text; TF: its tokens), so locality asks "did the output change", not "is it right".
- **Score** = harmonic mean of the six numbers (Rel, Gen, Loc, each AG and TF).
- CounterFact probability comparisons (looser): efficacy / paraphrase success = share of prompts
  where the mean per-token log-probability of the new target beats the old one; neighborhood
  success = share of locality prompts where the locality answer beats the new target. Only for
  edits that have an old target. **cf_score** = CounterFact's own score, the harmonic mean of ES,
  PS and NS (the field's headline number, reported beside ours).
- A locality prompt that is itself the prompt of an edit in the edit set asks an edited fact: its
  answer is meant to change, so it is not asked as locality (``skip_locality``; the count is reported).

Every editor implements ``Editor.apply(loaded, edits) -> EditedLM``; an ``EditedLM`` generates and
scores batches of prompts and ``close()`` puts the base model back as it was. Batches are sorted
by length, generation is left-padded and greedy, so results are deterministic.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from meg import generation, lm, neuron, textbatch

if TYPE_CHECKING:
    from meg.facts import EditRequest

MAX_NEW_TOKENS = 20
METRICS = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf")

# A function that, for a batch of prompts, gives each its neuron weights (B, P) and an active mask.
WeightsFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def normalise_answer(text: str) -> str:
    text = text.split("\n", 1)[0].strip()
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def answer_decided(text: str, want: str | None) -> bool:
    """Whether more generated tokens can no longer change the AG outcome for ``text`` vs ``want``.

    ``text`` is the continuation decoded so far, ``want`` a normalised expected answer (or None:
    only the first newline decides). AG compares the first line only, so a newline decides. Without
    one, the outcome is still open while the stripped, case-folded text is a prefix of ``want``, or
    is ``want`` followed by nothing but dots and spaces (a newline could still follow); anything
    else can never normalise to ``want``. Conservative where unsure: a trailing replacement
    character (an incomplete multi-byte character) keeps the row going.
    """
    if "\n" in text:
        return True
    if want is None:
        return False
    head = text.lstrip().rstrip("\ufffd").casefold()
    if want.startswith(head):
        return False
    return not (head.startswith(want) and not head[len(want):].strip(". "))


class EditedLM:
    """A base model, possibly changed by an editor, that generates and scores prompts.

    ``weights_fn`` (optional) gives every prompt of a batch its own dynamic-neuron weights at
    ``layer``; without it the model runs as it is.
    """

    def __init__(
        self,
        loaded: lm.LoadedModel,
        weights_fn: WeightsFn | None = None,
        layer: int | None = None,
        act: str = "identity",
        batch_size: int = 32,
        restore: Callable[[], None] | None = None,
    ):
        self.loaded, self.weights_fn, self.layer, self.act = loaded, weights_fn, layer, act
        self.batch_size = batch_size
        self.progress = False  # progress bars over the batches of generate and score (long evaluations)
        self._restore = restore

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def _neuron_ctx(self):
        if self.weights_fn is None:
            return nullcontext(None)
        return neuron.attached_neuron(self.loaded.model, self.layer, self.act)

    def _set(self, neuron_mod, prompts: list[str]) -> None:
        if neuron_mod is not None:
            w, active = self.weights_fn(prompts)
            neuron_mod.set_weights(w, active)

    def _batches(self, n: int, key: Callable[[int], int], desc: str = ""):
        order = sorted(range(n), key=key)
        starts = range(0, n, self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=desc, unit="batch", mininterval=5.0)
        for i in starts:
            yield order[i : i + self.batch_size]

    def release_texts(self, prompts: list[str]) -> list[str | None] | None:
        """Per prompt, the text after which its neuron is switched off (``meg.generation``); None: never."""
        return None

    def render(self, prompts: list[str], chat: bool) -> list[str]:
        """The model's inputs for ``prompts``: as they are, or with ``chat`` each as a user turn of the chat template."""
        return [generation.chat_prompt(self.loaded.tokenizer, p) for p in prompts] if chat else list(prompts)

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: list[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        expected: list[str | None] | None = None,
        chat: bool = False,
        release: bool = False,
    ) -> list[list[int]]:
        """Greedy continuations (token ids, without the prompt) in the order of ``prompts``.

        With ``expected`` (one normalised answer or None per prompt), a row stops as soon as its AG
        outcome is decided (``answer_decided``): at the first newline, or once the text can no
        longer match. The AG metrics are the same as with full-length generation; the decoded
        outputs are shorter. ``chat``: each prompt is a question asked as a user turn (routed on the
        question); a row ends at the end of the turn. ``release``: a row's neuron is switched off once
        its answer states the text ``release_texts`` gives it (meg.generation).
        """
        out: list[list[int]] = [[] for _ in prompts]
        for idx in self._batches(len(prompts), key=lambda i: len(prompts[i]), desc="generate"):
            questions = [prompts[i] for i in idx]
            w = active = rel = None
            if self.weights_fn is not None:
                w, active = self.weights_fn(questions)
                rel = self.release_texts(questions) if release else None
            decided = None
            if expected is not None:
                want = [expected[i] for i in idx]
                decided = lambda text, row, want=want: answer_decided(text, want[row])  # noqa: E731
            ids = generation.generate_ids(self.loaded, self.render(questions, chat), w, active, self.layer, self.act,
                                          max_new_tokens, decided=decided, release=rel, add_special_tokens=not chat)
            for row, i in enumerate(idx):
                out[i] = ids[row]
        return out

    def generate(
        self, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, expected: list[str | None] | None = None,
        chat: bool = False, release: bool = False,
    ) -> list[str]:
        tok = self.loaded.tokenizer
        ids = self.generate_ids(prompts, max_new_tokens, expected, chat=chat, release=release)
        return [tok.decode(i, skip_special_tokens=True) for i in ids]

    @torch.no_grad()
    def score_ids(self, prompts: list[str], target_ids: list[list[int]],
                  chat: bool = False) -> tuple[list[float], list[float]]:
        """Teacher-forced (token accuracy, mean token log-prob) of each target after its prompt (``chat``: after
        the prompt asked as a user turn, routed on the prompt)."""
        tok = self.loaded.tokenizer
        acc: list[float] = [0.0] * len(prompts)
        logp: list[float] = [0.0] * len(prompts)
        with self._neuron_ctx() as neuron_mod:
            for idx in self._batches(len(prompts), key=lambda i: len(prompts[i]), desc="score"):
                questions = [prompts[i] for i in idx]
                batch = textbatch.encode_ids(tok, self.render(questions, chat), [target_ids[i] for i in idx],
                                             add_special_tokens=not chat)
                batch = batch.to(self.loaded.model.device)
                self._set(neuron_mod, questions)
                logits = textbatch.logits_at(self.loaded.model, batch)
                correct = (logits.argmax(-1) == batch.labels).float()
                lp = torch.log_softmax(logits, -1).gather(1, batch.labels[:, None]).squeeze(1)
                row_acc = textbatch.per_row_mean(correct, batch.owner, len(idx))
                row_lp = textbatch.per_row_mean(lp, batch.owner, len(idx))
                for row, i in enumerate(idx):
                    acc[i], logp[i] = float(row_acc[row]), float(row_lp[row])
        return acc, logp

    def score(self, prompts: list[str], targets: list[str]) -> tuple[list[float], list[float]]:
        tok = self.loaded.tokenizer
        ids = [tok(textbatch.target_text(t), add_special_tokens=False).input_ids for t in targets]
        return self.score_ids(prompts, ids)


class Editor(ABC):
    """Applies a list of edits to a base model.

    ``probes`` (a ``meg.probes.Blocklist``, set by the harness before ``apply``) is what the evaluation will
    ask: an editor that fits, trains or calibrates on anything besides the edit prompts keeps it out.
    ``tuning_texts`` are the texts its settings were chosen on (pseudo-edits), for the leak counters.
    """

    name: str = "editor"
    label: str = ""  # the method as run, for tables ("MEMIT", "MeG, lookup weights"); the name when empty
    probes = None

    @abstractmethod
    def apply(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> EditedLM:
        """Edit the model; the returned object's ``close()`` restores the base model."""

    def tuning_texts(self) -> list[str]:
        return []

    def exposure(self, edited: EditedLM, edits: "list[EditRequest]"):
        """What this edit of ``edits`` fitted, trained or calibrated on (``meg.probes.Exposure``): by default
        each edit's prompt and the tuning texts; an edited model that records its own wins."""
        from meg.probes import prompt_only_exposure

        own = getattr(edited, "exposure", None)
        return own if own is not None else prompt_only_exposure(edits, self.tuning_texts())


class NoEdit(Editor):
    """The unedited model: the reference every metric is read against."""

    name = "none"

    label = "unedited model"

    def apply(self, loaded, edits):
        return EditedLM(loaded)

    def exposure(self, edited, edits):
        from meg.probes import Exposure

        return Exposure()


@dataclass
class LocalityLabels:
    """The pre-edit model's own greedy answers to the locality prompts."""

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]


def _answer_ids(tok, ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the first newline; at least one token."""
    for j, t in enumerate(ids):
        if "\n" in tok.decode([t]):
            return ids[:j] if j else ids[:1]
    return ids if ids else [tok.eos_token_id]


def locality_labels(base: EditedLM, edits: "list[EditRequest]", protocol: str = "ag") -> LocalityLabels:
    """The unedited model's answers to the locality prompts: first lines (``ag``), or whole chat answers
    (``chat``: each prompt asked as a user turn, up to ``CHAT_MAX_NEW_TOKENS``, to the end of the turn)."""
    prompts = [e.locality[0].prompt if e.locality else e.prompt for e in edits]
    tok = base.loaded.tokenizer
    if protocol == "chat":
        gen = base.generate_ids(prompts, generation.CHAT_MAX_NEW_TOKENS, chat=True)
        return LocalityLabels(prompts=prompts, texts=[tok.decode(g, skip_special_tokens=True) for g in gen],
                              token_ids=[[t for t in g if t != tok.eos_token_id] or [tok.eos_token_id] for g in gen])
    gen = base.generate_ids(prompts, expected=[None] * len(prompts))  # the first line is all that counts
    return LocalityLabels(
        prompts=prompts,
        texts=[tok.decode(g, skip_special_tokens=True) for g in gen],
        token_ids=[_answer_ids(tok, g) for g in gen],
    )


@dataclass
class EvalResult:
    metrics: dict[str, float | None]
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return statistics.harmonic_mean(values)


def edited_locality(edits: "list[EditRequest]", applied: "list[EditRequest]") -> list[bool]:
    """Per evaluated edit: whether its locality prompt is the prompt of an applied edit (an edited fact, whose
    answer is meant to change: not asked as locality)."""
    from meg.probes import norm_text

    prompts = {norm_text(e.prompt) for e in applied}
    return [bool(e.locality) and norm_text(e.locality[0].prompt) in prompts for e in edits]


def chat_answer(text: str) -> str:
    """A chat answer as compared for locality: whitespace collapsed, case-folded."""
    return " ".join(text.split()).casefold()


def evaluate_chat(model: EditedLM, edits: "list[EditRequest]", labels: LocalityLabels,
                  skip_locality: list[bool] | None = None) -> EvalResult:
    """The chat protocol: every probe asked as a user turn of the chat template, answered freely (greedy, up
    to ``CHAT_MAX_NEW_TOKENS``, to the end of the turn). An edit prompt or paraphrase is right when the answer
    states the new target (``generation.states``: case-folded, as a whole word); a locality prompt is kept
    when the answer equals the unedited model's chat answer (``labels`` of protocol "chat"). TF: the target's
    tokens (no leading space: an answer starts the turn) and the unedited answer's tokens, teacher-forced after
    the rendered prompt. ``repeats``: the share of edit-prompt and paraphrase answers stating the target three
    times or more (an answer should read as one). A routed question's neuron is switched off once its answer
    states the routed edit's target (``release``)."""
    t0 = time.time()
    n = len(edits)
    prompts = [e.prompt for e in edits]
    paras = [e.paraphrases[0] if e.paraphrases else e.prompt for e in edits]
    targets = [e.target_new for e in edits]
    texts = model.generate(prompts + paras + labels.prompts, generation.CHAT_MAX_NEW_TOKENS, chat=True, release=True)
    rel_txt, gen_txt, loc_txt = texts[:n], texts[n : 2 * n], texts[2 * n :]
    rel_ag = [generation.states(t, w) for t, w in zip(rel_txt, targets)]
    gen_ag = [generation.states(t, w) for t, w in zip(gen_txt, targets)]
    loc_ag = [chat_answer(t) == chat_answer(l) for t, l in zip(loc_txt, labels.texts)]
    asked = [not (skip_locality and skip_locality[i]) for i in range(n)]
    tok = model.loaded.tokenizer
    new_ids = [tok(t.strip(), add_special_tokens=False).input_ids for t in targets]
    tf_acc, _ = model.score_ids(prompts + paras + labels.prompts, new_ids + new_ids + labels.token_ids, chat=True)
    rel_tf, gen_tf, loc_tf = tf_acc[:n], tf_acc[n : 2 * n], tf_acc[2 * n :]

    def pct(xs):
        return 100.0 * sum(float(x) for x in xs) / max(1, len(xs))

    def repeated(text, target):
        t = " ".join(target.casefold().split())
        return bool(t) and " ".join(text.casefold().split()).count(t) >= 3

    metrics: dict[str, float | None] = {
        "rel_ag": pct(rel_ag), "rel_tf": pct(rel_tf), "gen_ag": pct(gen_ag), "gen_tf": pct(gen_tf),
        "loc_ag": pct([x for x, a in zip(loc_ag, asked) if a]), "loc_tf": pct([x for x, a in zip(loc_tf, asked) if a]),
    }
    metrics["score"] = harmonic_mean([metrics[k] for k in METRICS])
    metrics.update(es=None, ps=None, ns=None, cf_score=None, n_locality_edited=float(n - sum(asked)),
                   repeats=pct([repeated(t, w) for t, w in zip(rel_txt + gen_txt, targets + targets)]))
    records = [
        {"id": e.id, "target": e.target_new, "rel_out": rel_txt[i], "gen_out": gen_txt[i], "loc_out": loc_txt[i],
         "loc_label": labels.texts[i], "rel_ag": rel_ag[i], "gen_ag": gen_ag[i],
         "loc_ag": loc_ag[i] if asked[i] else None, "rel_tf": rel_tf[i], "gen_tf": gen_tf[i],
         "loc_tf": loc_tf[i] if asked[i] else None}
        for i, e in enumerate(edits)
    ]
    return EvalResult(metrics=metrics, records=records, seconds=time.time() - t0)


def evaluate(model: EditedLM, edits: "list[EditRequest]", labels: LocalityLabels,
             skip_locality: list[bool] | None = None, protocol: str = "ag") -> EvalResult:
    """All metrics for one edited model; percentages 0-100. ``skip_locality[i]``: edit i's locality prompt is
    not asked (``edited_locality``); its locality fields are None and it counts in no locality number.
    ``protocol`` "chat": ``evaluate_chat`` (labels must be chat labels)."""
    if protocol == "chat":
        return evaluate_chat(model, edits, labels, skip_locality)
    if protocol != "ag":
        raise ValueError(f"evaluate: unknown protocol {protocol!r} (ag, chat)")
    t0 = time.time()
    prompts = [e.prompt for e in edits]
    paras = [e.paraphrases[0] if e.paraphrases else e.prompt for e in edits]
    targets = [e.target_new for e in edits]
    want = [normalise_answer(t) for t in targets]
    loc_want = [normalise_answer(t) for t in labels.texts]
    texts = model.generate(prompts + paras + labels.prompts, expected=want + want + loc_want)
    n = len(edits)
    rel_txt, gen_txt, loc_txt = texts[:n], texts[n : 2 * n], texts[2 * n :]
    rel_ag = [normalise_answer(t) == w for t, w in zip(rel_txt, want)]
    gen_ag = [normalise_answer(t) == w for t, w in zip(gen_txt, want)]
    loc_ag = [normalise_answer(t) == normalise_answer(l) for t, l in zip(loc_txt, labels.texts)]
    asked = [not (skip_locality and skip_locality[i]) for i in range(n)]
    tok = model.loaded.tokenizer
    new_ids = [tok(textbatch.target_text(t), add_special_tokens=False).input_ids for t in targets]
    tf_acc, tf_lp = model.score_ids(prompts + paras + labels.prompts, new_ids + new_ids + labels.token_ids)
    rel_tf, gen_tf, loc_tf = tf_acc[:n], tf_acc[n : 2 * n], tf_acc[2 * n :]
    lp_new_rel, lp_new_gen = tf_lp[:n], tf_lp[n : 2 * n]

    has_old = [i for i, e in enumerate(edits) if e.target_old]
    es = ps = ns = None
    if has_old:
        old = [edits[i].target_old for i in has_old]
        loc_true = [(edits[i].locality[0].answer if edits[i].locality else None) or edits[i].target_old
                    for i in has_old]
        loc_prompts = [labels.prompts[i] for i in has_old]
        _, lp = model.score(
            [prompts[i] for i in has_old] + [paras[i] for i in has_old] + loc_prompts + loc_prompts,
            old + old + loc_true + [targets[i] for i in has_old],
        )
        m = len(has_old)
        es_l = [lp_new_rel[i] > lp[j] for j, i in enumerate(has_old)]
        ps_l = [lp_new_gen[i] > lp[m + j] for j, i in enumerate(has_old)]
        ns_l = [lp[2 * m + j] > lp[3 * m + j] for j, i in enumerate(has_old) if asked[i]]
        es, ps = (100.0 * sum(x) / m for x in (es_l, ps_l))
        ns = 100.0 * sum(ns_l) / max(1, len(ns_l))

    def pct(xs):
        return 100.0 * sum(float(x) for x in xs) / max(1, len(xs))

    loc_ag_kept = [x for x, a in zip(loc_ag, asked) if a]
    loc_tf_kept = [x for x, a in zip(loc_tf, asked) if a]
    metrics: dict[str, float | None] = {
        "rel_ag": pct(rel_ag), "rel_tf": pct(rel_tf), "gen_ag": pct(gen_ag), "gen_tf": pct(gen_tf),
        "loc_ag": pct(loc_ag_kept), "loc_tf": pct(loc_tf_kept),
    }
    metrics["score"] = harmonic_mean([metrics[k] for k in METRICS])
    metrics.update({"es": es, "ps": ps, "ns": ns})
    metrics["cf_score"] = harmonic_mean([es, ps, ns]) if es is not None else None
    metrics["n_locality_edited"] = float(n - sum(asked))
    records = [
        {
            "id": e.id, "target": e.target_new,
            "rel_out": rel_txt[i], "gen_out": gen_txt[i], "loc_out": loc_txt[i], "loc_label": labels.texts[i],
            "rel_ag": rel_ag[i], "gen_ag": gen_ag[i], "loc_ag": loc_ag[i] if asked[i] else None,
            "rel_tf": rel_tf[i], "gen_tf": gen_tf[i], "loc_tf": loc_tf[i] if asked[i] else None,
        }
        for i, e in enumerate(edits)
    ]
    return EvalResult(metrics=metrics, records=records, seconds=time.time() - t0)
