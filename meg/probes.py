"""What is evaluated is never fitted, trained or calibrated on: probes, their templates, and the exposure of a build.

The evaluation asks each edit's prompt, its first paraphrase (generality) and its first locality
prompt. The paraphrase and the locality prompt are *probes*: a build must never see them. A
paraphrase is also a wording of a relation ("{} is a native speaker of"), its *template* (the
sentence holding the subject, subject taken out); CounterFact states each relation with the same few
hundred templates in every split, so a neuron fitted on another subject's sentence of that template
has already seen the wording it will be asked in. The rule, checked by construction and counted in
every result:

- no probe text (after ``norm_text``) is fitted, trained on or calibrated on, in any role;
- no text in a *rewording* role (a wording fitted to produce an edit's target besides the edit's
  own prompt, an encoder positive, a calibration positive, a generator condition for a rewording)
  has the template of a probe paraphrase.

Texts in a *statement* role are exempt from the template rule: an edit's own prompt must be fitted,
and a pseudo-edit's prompt states a fact the same way an edit prompt does. (98% of CounterFact's
train prompts use a template that is also some edit's paraphrase template; the relation wordings
are one closed set.) For the benchmarks, the probes of every record of every benchmark edit split
are blocked up front, whatever slice is edited, as edit prompts already are.

A build records what it saw in an ``Exposure``; ``leaks`` counts, for the evaluated edits, the
paraphrases whose template (or text) reached a rewording role or the edit's own fit, and the
locality prompts and paraphrases that reached anything at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from meg.subject_gate import SENTENCE_END

if TYPE_CHECKING:
    from meg.facts import EditRequest



def template_of(text: str, subject: str | None) -> str | None:
    """The relation template of a prompt: the sentence holding the subject, subject -> "{}"."""
    if not subject or subject not in text:
        return None
    for part in reversed(SENTENCE_END.split(text)):
        if subject in part:
            t = part.replace(subject, "{}", 1).strip()
            return t if t != "{}" and "{" not in t.replace("{}", "", 1) else None
    return None


def norm_text(text: str) -> str:
    """Case-folded, whitespace-collapsed text without trailing '?', ':', '.' or spaces: the form compared."""
    return " ".join(text.casefold().split()).rstrip("?:. ")


def probe_paraphrase(e: "EditRequest") -> str | None:
    """The paraphrase the evaluation asks (the first one), or None."""
    return e.paraphrases[0] if e.paraphrases else None


def probe_locality(e: "EditRequest") -> str | None:
    """The locality prompt the evaluation asks (the first one), or None."""
    return e.locality[0].prompt if e.locality else None


@dataclass(frozen=True)
class Blocklist:
    """Probe texts and probe-paraphrase templates, both in ``norm_text`` form."""

    texts: frozenset[str] = frozenset()
    templates: frozenset[str] = frozenset()

    @classmethod
    def of(cls, edits: Iterable["EditRequest"]) -> "Blocklist":
        """The probes of ``edits``: every paraphrase and locality prompt, and the paraphrases' templates.

        Every paraphrase is blocked, not only the evaluated first one: a fact file's further paraphrases are
        fitted only through ``user_rewordings``, which never hands out a blocked one.
        """
        texts, templates = set(), set()
        for e in edits:
            for p in e.paraphrases:
                texts.add(norm_text(p))
                t = template_of(p, e.subject)
                if t:
                    templates.add(norm_text(t))
            texts.update(norm_text(q.prompt) for q in e.locality)
        return cls(frozenset(texts), frozenset(templates))

    @classmethod
    def of_probes(cls, edits: Iterable["EditRequest"]) -> "Blocklist":
        """Only what the evaluation asks of ``edits``: the first paraphrase (and its template), the first
        locality prompt."""
        texts, templates = set(), set()
        for e in edits:
            p, q = probe_paraphrase(e), probe_locality(e)
            if p:
                texts.add(norm_text(p))
                t = template_of(p, e.subject)
                if t:
                    templates.add(norm_text(t))
            if q:
                texts.add(norm_text(q))
        return cls(frozenset(texts), frozenset(templates))

    def __or__(self, other: "Blocklist") -> "Blocklist":
        return Blocklist(self.texts | other.texts, self.templates | other.templates)

    def __len__(self) -> int:
        return len(self.texts) + len(self.templates)

    def text_blocked(self, text: str) -> bool:
        return norm_text(text) in self.texts

    def template_blocked(self, template: str | None) -> bool:
        return template is not None and norm_text(template) in self.templates

    def blocks_rewording(self, text: str, subject: str | None) -> bool:
        """Whether ``text`` may not be used as a rewording: it is a probe, or has a probe paraphrase's template."""
        return self.text_blocked(text) or self.template_blocked(template_of(text, subject))


@functools.lru_cache(maxsize=1)
def benchmark_blocklist() -> Blocklist:
    """The probes of every record of every benchmark edit split (CounterFact edit, ZsRE)."""
    from meg.facts import BENCHMARKS, load_benchmark

    return Blocklist.of(e for name, split in BENCHMARKS if split != "train" for e in load_benchmark(name, split))


def blocklist_for(evaluated: Iterable["EditRequest"] = ()) -> Blocklist:
    """What a build must not see: the benchmark probes and the probes of the edits it will be evaluated on."""
    return benchmark_blocklist() | Blocklist.of(evaluated)


@dataclass
class Exposure:
    """Every text a build fitted, trained or calibrated on, by role.

    ``fitted``: per edit content key, the texts its neuron was fitted on (the prompt first);
    ``rewordings``: (text, subject) pairs used in a rewording role anywhere else (encoder and calibration
    positives, generator conditions of rewordings); ``seen``: every other text that reached training or
    calibration (encoder anchors and negatives, calibration prompts, negatives and filler).
    """

    fitted: dict[str, list[str]] = field(default_factory=dict)
    rewordings: list[tuple[str, str | None]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add_seen(self, texts: Iterable[str | None]) -> None:
        self.seen.update(norm_text(t) for t in texts if t)

    def add_rewordings(self, pairs: Iterable[tuple[str, str | None]]) -> None:
        self.rewordings.extend(pairs)

    def leaks(self, evaluated: list["EditRequest"], locality_asked: list[bool] | None = None) -> dict:
        """Leak counters of the evaluated edits (0 when the build is clean).

        ``paraphrase_templates_fitted``: evaluated paraphrases whose template (or text, for an edit without a
        subject) is that of a rewording the edit was fitted on (its prompt, with or without a prefix, is the
        edit, not a rewording), or of a text in a rewording role anywhere;
        ``paraphrases_trained``: evaluated paraphrases whose text reached any role;
        ``locality_prompts_trained``: evaluated locality prompts (those asked, ``locality_asked``) whose text
        reached any role, fitting included.
        """
        every = set(self.seen)
        every.update(norm_text(t) for texts in self.fitted.values() for t in texts)
        every.update(norm_text(t) for t, _ in self.rewordings)
        global_templates = {norm_text(t) for text, s in self.rewordings if (t := template_of(text, s))}
        global_texts = {norm_text(t) for t, _ in self.rewordings}
        para_tpl = para_txt = loc = 0
        for i, e in enumerate(evaluated):
            p = probe_paraphrase(e)
            if p:
                own = self.fitted.get(e.content_key, [])
                own = [x for x in own[1:] if not norm_text(x).endswith(norm_text(own[0]))]  # the edit's
                # own statement and its prefixed copies are the edit itself; a paraphrase with its wording is
                # answered by any edit of the prompt, fitted or not (CounterFact has 4 in its first 1,000)
                tpl = template_of(p, e.subject)
                own_templates = {norm_text(t) for x in own if (t := template_of(x, e.subject))}
                if tpl is not None:
                    hit = norm_text(tpl) in own_templates or norm_text(tpl) in global_templates
                else:
                    hit = norm_text(p) in {norm_text(x) for x in own} or norm_text(p) in global_texts
                para_tpl += hit
                para_txt += norm_text(p) in every
            q = probe_locality(e)
            if q and (locality_asked is None or locality_asked[i]):
                loc += norm_text(q) in every
        return {"paraphrase_templates_fitted": para_tpl, "paraphrases_trained": para_txt,
                "locality_prompts_trained": loc, "n_evaluated": len(evaluated)}


def prompt_only_exposure(edits: Iterable["EditRequest"], tuning: Iterable[str] = ()) -> Exposure:
    """The exposure of an editor that fits each edit's prompt alone (``tuning``: texts its settings were chosen on)."""
    exp = Exposure(fitted={e.content_key: [e.prompt] for e in edits})
    exp.add_seen(tuning)
    return exp


class RecordedLeaks:
    """Leak counters recorded when a model was built (a loaded bundle no longer knows what it saw)."""

    def __init__(self, leaks: dict | None):
        self.recorded = dict(leaks) if leaks else None

    def leaks(self, evaluated: list["EditRequest"], locality_asked: list[bool] | None = None) -> dict:
        if self.recorded is None:
            return {"unknown": True, "n_evaluated": len(evaluated)}  # a bundle from before the counters
        if self.recorded.get("n_evaluated") != len(evaluated):
            return {**self.recorded, "note": "recorded for the bundle's whole edit set"}
        return self.recorded
