"""Other phrasings of an edit's relation, learned from pseudo-edits (never from evaluated edits).

A neuron fitted on one prompt often fails on a rewording of it. The CounterFact *train* split
shows how relations are reworded: each record pairs a prompt with a paraphrase about the same
subject. Replacing the subject by ``{}`` turns both into relation templates
("The mother tongue of {} is" ~ "{} is a native speaker of"); linking the two templates of every
train record and taking connected components gives groups of interchangeable phrasings.

For an edit whose prompt matches a known template, ``TemplateBank.variants`` fills its subject into
other templates of the same group. Fitting the neuron on these variants as well as on the prompt
makes it fire on rewordings the edit never states. Only train-split text is read; an edit whose
template is unknown (most user facts) simply gets no variants.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def template_of(text: str, subject: str) -> str | None:
    """The relation template of a prompt: the sentence holding the subject, subject -> "{}"."""
    if not subject or subject not in text:
        return None
    parts = _SENTENCE_END.split(text)
    for part in reversed(parts):
        if subject in part:
            t = part.replace(subject, "{}", 1).strip()
            return t if t != "{}" and "{" not in t.replace("{}", "", 1) else None
    return None


class TemplateBank:
    """Relation templates and the rewordings of each seen in pseudo-edits, with counts."""

    def __init__(self) -> None:
        self._edges: dict[str, Counter] = defaultdict(Counter)

    def link(self, a: str, b: str) -> None:
        if a != b:
            self._edges[a][b] += 1
            self._edges[b][a] += 1

    @classmethod
    def from_records(cls, records) -> "TemplateBank":
        """Build from pseudo-edits (objects with .prompt, .subject and .paraphrases)."""
        bank = cls()
        for r in records:
            a = template_of(r.prompt, r.subject or "")
            for para in r.paraphrases:
                b = template_of(para, r.subject or "")
                if a and b:
                    bank.link(a, b)
        return bank

    def __len__(self) -> int:
        return len(self._edges)

    def __contains__(self, template: str) -> bool:
        return template in self._edges

    def neighbours(self, template: str) -> list[str]:
        """Rewordings seen with ``template``, most frequent first (ties alphabetical)."""
        return [t for t, _ in sorted(self._edges.get(template, {}).items(), key=lambda kv: (-kv[1], kv[0]))]

    def variants(self, prompt: str, subject: str | None, n: int) -> list[str]:
        """Up to ``n`` rewordings of ``prompt``: its template's most frequent partners, subject filled in."""
        t = template_of(prompt, subject or "")
        if n <= 0 or t is None:
            return []
        return [u.replace("{}", subject, 1) for u in self.neighbours(t)[:n]]
