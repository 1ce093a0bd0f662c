"""Other phrasings of an edit's relation, learned from pseudo-edits (never from evaluated edits).

A neuron fitted on one prompt often fails on a rewording of it. The CounterFact *train* split
shows how relations are reworded: each record pairs a prompt with a paraphrase about the same
subject. Replacing the subject by ``{}`` turns both into relation templates
("The mother tongue of {} is" ~ "{} is a native speaker of"); linking the two templates of every
train record and taking connected components gives groups of interchangeable phrasings.

For an edit whose prompt matches a known template, ``TemplateBank.variants`` fills its subject into
other templates of the same group. Fitting the neuron on these variants as well as on the prompt
makes it fire on rewordings the edit never states. An edit whose template is unknown simply gets
no variants.

The edit set itself can teach rewordings too: two edits on the same subject whose questions mean
nearly the same ("What company made {}?" and "Which corporation created {}?", judged by the cosine
of their templates under the base sentence encoder) state one relation in two ways, so
``link_same_subject`` links their templates. Only edit prompts and subjects are read, never an
evaluation paraphrase. A rewording that is itself another edit's prompt with another target is never
offered: that text belongs to the other edit.
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
        self._groups: list[list[str]] | None = None
        self._taken: dict[str, set[str]] = defaultdict(set)  # edit prompt -> its targets

    def link(self, a: str, b: str) -> None:
        if a != b:
            self._edges[a][b] += 1
            self._edges[b][a] += 1
            self._groups = None

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

    def link_same_subject(self, edits, encode, min_similarity: float) -> int:
        """Link the templates of edits on one subject whose templates have cosine >= ``min_similarity``.

        ``encode`` maps texts to embeddings (the base sentence encoder). Returns the number of
        template pairs linked. Every edit prompt is marked as taken by its target (see ``variants``).
        """
        by_subject: dict[str, set[str]] = defaultdict(set)
        for e in edits:
            self._taken[e.prompt].add(e.target_new)
            t = template_of(e.prompt, e.subject or "")
            if t:
                by_subject[e.subject].add(t)
        candidates = sorted({(a, b) for ts in by_subject.values() for a in ts for b in ts if a < b})
        if not candidates:
            return 0
        texts = sorted({t for pair in candidates for t in pair})
        index = {t: i for i, t in enumerate(texts)}
        emb = encode([t.replace("{}", "it") for t in texts])
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        linked = 0
        for a, b in candidates:
            if float(emb[index[a]] @ emb[index[b]]) >= min_similarity:
                self.link(a, b)
                linked += 1
        return linked

    def __len__(self) -> int:
        return len(self._edges)

    def __contains__(self, template: str) -> bool:
        return template in self._edges

    def neighbours(self, template: str) -> list[str]:
        """Rewordings seen with ``template``, most frequent first (ties alphabetical)."""
        return [t for t, _ in sorted(self._edges.get(template, {}).items(), key=lambda kv: (-kv[1], kv[0]))]

    def groups(self) -> list[list[str]]:
        """Connected groups of interchangeable templates, largest first; templates most frequent first."""
        if self._groups is None:
            seen: set[str] = set()
            groups = []
            for start in sorted(self._edges):
                if start in seen:
                    continue
                seen.add(start)
                stack, group = [start], []
                while stack:
                    t = stack.pop()
                    group.append(t)
                    for u in self._edges[t]:
                        if u not in seen:
                            seen.add(u)
                            stack.append(u)
                weight = {t: sum(self._edges[t].values()) for t in group}
                groups.append(sorted(group, key=lambda t: (-weight[t], t)))
            self._groups = sorted(groups, key=lambda g: (-len(g), g[0]))
        return self._groups

    def other_relation(self, prompt: str, subject: str | None, index: int) -> str | None:
        """A question about the same subject from another group of templates (a relation the prompt is not).

        Deterministic in ``index``: the groups other than the prompt's are taken in turn, each by its
        most frequent template. None without a subject or when the bank has a single group.
        """
        if not subject:
            return None
        own = template_of(prompt, subject)
        others = [g for g in self.groups() if own not in g]
        if not others:
            return None
        group = others[index % len(others)]
        return group[(index // len(others)) % len(group)].replace("{}", subject, 1)

    def variants(self, prompt: str, subject: str | None, n: int, target: str | None = None) -> list[str]:
        """Up to ``n`` rewordings of ``prompt``: its template's most frequent partners, subject filled in.

        Rewordings that are the prompt of an edit with another target than ``target`` are skipped.
        """
        t = template_of(prompt, subject or "")
        if n <= 0 or t is None:
            return []
        filled = (u.replace("{}", subject, 1) for u in self.neighbours(t))
        return [v for v in filled if not (self._taken.get(v, set()) - {target})][:n]
