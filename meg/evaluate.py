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
  edits that have an old target.

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

from meg import lm, neuron, textbatch

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

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: list[str],
        max_new_tokens: int = MAX_NEW_TOKENS,
        expected: list[str | None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (token ids, without the prompt) in the order of ``prompts``.

        With ``expected`` (one normalised answer or None per prompt), a row stops as soon as its AG
        outcome is decided (``answer_decided``): at the first newline, or once the text can no
        longer match. The AG metrics are the same as with full-length generation; the decoded
        outputs are shorter.
        """
        tok, model = self.loaded.tokenizer, self.loaded.model
        out: list[list[int]] = [[] for _ in prompts]
        with self._neuron_ctx() as neuron_mod:
            for idx in self._batches(len(prompts), key=lambda i: len(prompts[i]), desc="generate"):
                batch_prompts = [prompts[i] for i in idx]
                enc = tok(batch_prompts, return_tensors="pt", padding=True).to(model.device)
                self._set(neuron_mod, batch_prompts)
                stop = None
                if expected is not None:
                    stop = [_AnswerStop(tok, enc.input_ids.shape[1], [expected[i] for i in idx])]
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    stopping_criteria=stop,
                )
                new = gen[:, enc.input_ids.shape[1] :]
                for row, i in enumerate(idx):
                    ids = new[row].tolist()
                    while ids and ids[-1] == tok.pad_token_id:
                        ids.pop()
                    out[i] = ids
        return out

    def generate(
        self, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, expected: list[str | None] | None = None
    ) -> list[str]:
        tok = self.loaded.tokenizer
        ids = self.generate_ids(prompts, max_new_tokens, expected)
        return [tok.decode(i, skip_special_tokens=True) for i in ids]

    @torch.no_grad()
    def score_ids(self, prompts: list[str], target_ids: list[list[int]]) -> tuple[list[float], list[float]]:
        """Teacher-forced (token accuracy, mean token log-prob) of each target after its prompt."""
        tok = self.loaded.tokenizer
        acc: list[float] = [0.0] * len(prompts)
        logp: list[float] = [0.0] * len(prompts)
        with self._neuron_ctx() as neuron_mod:
            for idx in self._batches(len(prompts), key=lambda i: len(prompts[i]), desc="score"):
                batch = textbatch.encode_ids(tok, [prompts[i] for i in idx], [target_ids[i] for i in idx])
                batch = batch.to(self.loaded.model.device)
                self._set(neuron_mod, [prompts[i] for i in idx])
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


class _AnswerStop:
    """Stopping criterion: a row is done once its AG outcome is decided (see ``answer_decided``)."""

    def __init__(self, tok, prompt_len: int, expected: list[str | None]):
        self.tok, self.prompt_len, self.expected = tok, prompt_len, expected
        self.done = torch.zeros(len(expected), dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        for row in (~self.done).nonzero().flatten().tolist():
            text = self.tok.decode(new[row], skip_special_tokens=True)
            self.done[row] = answer_decided(text, self.expected[row])
        return self.done.to(input_ids.device).clone()


class Editor(ABC):
    """Applies a list of edits to a base model."""

    name: str = "editor"

    @abstractmethod
    def apply(self, loaded: lm.LoadedModel, edits: "list[EditRequest]") -> EditedLM:
        """Edit the model; the returned object's ``close()`` restores the base model."""


class NoEdit(Editor):
    """The unedited model: the reference every metric is read against."""

    name = "none"

    def apply(self, loaded, edits):
        return EditedLM(loaded)


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


def locality_labels(base: EditedLM, edits: "list[EditRequest]") -> LocalityLabels:
    prompts = [e.locality[0].prompt if e.locality else e.prompt for e in edits]
    gen = base.generate_ids(prompts, expected=[None] * len(prompts))  # the first line is all that counts
    tok = base.loaded.tokenizer
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


def evaluate(model: EditedLM, edits: "list[EditRequest]", labels: LocalityLabels) -> EvalResult:
    """All metrics for one edited model; percentages 0-100."""
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
        ns_l = [lp[2 * m + j] > lp[3 * m + j] for j in range(m)]
        es, ps, ns = (100.0 * sum(x) / m for x in (es_l, ps_l, ns_l))

    def pct(xs):
        return 100.0 * sum(float(x) for x in xs) / max(1, len(xs))

    metrics: dict[str, float | None] = {
        "rel_ag": pct(rel_ag), "rel_tf": pct(rel_tf), "gen_ag": pct(gen_ag), "gen_tf": pct(gen_tf),
        "loc_ag": pct(loc_ag), "loc_tf": pct(loc_tf),
    }
    metrics["score"] = harmonic_mean([metrics[k] for k in METRICS])
    metrics.update({"es": es, "ps": ps, "ns": ns})
    records = [
        {
            "id": e.id, "target": e.target_new,
            "rel_out": rel_txt[i], "gen_out": gen_txt[i], "loc_out": loc_txt[i], "loc_label": labels.texts[i],
            "rel_ag": rel_ag[i], "gen_ag": gen_ag[i], "loc_ag": loc_ag[i],
            "rel_tf": rel_tf[i], "gen_tf": gen_tf[i], "loc_tf": loc_tf[i],
        }
        for i, e in enumerate(edits)
    ]
    return EvalResult(metrics=metrics, records=records, seconds=time.time() - t0)
