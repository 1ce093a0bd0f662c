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

What is evaluated never comes out of the bank (``meg.probes``): with a blocklist, no rewording it hands
out, and no other-relation question it hands out for fitting, is a probe or has a probe paraphrase's
template. Built from the pseudo-edits of a build (whose paraphrases are model-written rewordings,
``meg.rewrite``) it holds no benchmark paraphrase template at all. Statement templates (prompts) that
share answers are one relation for ``other_relation`` (never for ``variants``): without CounterFact's
paraphrase links, "The mother tongue of {} is" and "{} is a native speaker of" would otherwise count as
two relations and make true paraphrases into negatives.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from meg.probes import Blocklist, norm_text, template_of

__all__ = ["TemplateBank", "template_of"]

# Two statement templates whose answers overlap this much (Jaccard of their answer sets) ask one relation
ANSWER_OVERLAP = 0.2


class TemplateBank:
    """Relation templates and the rewordings of each seen in pseudo-edits, with counts."""

    def __init__(self, blocklist: Blocklist | None = None) -> None:
        self._edges: dict[str, Counter] = defaultdict(Counter)
        self._same_relation: dict[str, set[str]] = defaultdict(set)  # answer-overlap links (groups only)
        self._groups: list[list[str]] | None = None
        self._taken: dict[str, set[str]] = defaultdict(set)  # edit prompt -> its targets
        self.blocklist = blocklist or Blocklist()
        self.rewordings: dict[str, list[str]] = {}  # prompt -> model-written rewordings (meg.rewrite), best first

    def link(self, a: str, b: str) -> None:
        if a != b:
            self._edges[a][b] += 1
            self._edges[b][a] += 1
            self._groups = None

    @classmethod
    def from_records(cls, records, blocklist: Blocklist | None = None) -> "TemplateBank":
        """Build from pseudo-edits (objects with .prompt, .subject, .paraphrases and the targets).

        A paraphrase whose template the blocklist blocks links nothing. Prompt templates whose answers
        (targets old and new) overlap by ``ANSWER_OVERLAP`` or more count as one relation in ``groups``.
        """
        bank = cls(blocklist)
        answers: dict[str, set[str]] = defaultdict(set)
        for r in records:
            a = template_of(r.prompt, r.subject or "")
            if a is None:
                continue
            bank._edges.setdefault(a, Counter())
            answers[a].update(x.casefold() for x in (r.target_new, getattr(r, "target_old", None)) if x)
            for para in r.paraphrases:
                b = template_of(para, r.subject or "")
                if b and not bank.blocklist.template_blocked(b):
                    bank.link(a, b)
        templates = sorted(t for t in answers if len(answers[t]) >= 2)
        for i, a in enumerate(templates):
            for b in templates[i + 1 :]:
                inter = len(answers[a] & answers[b])
                if inter and inter / len(answers[a] | answers[b]) >= ANSWER_OVERLAP:
                    bank._same_relation[a].add(b)
                    bank._same_relation[b].add(a)
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
                    for u in (*self._edges[t], *self._same_relation.get(t, ())):
                        if u not in seen:
                            seen.add(u)
                            stack.append(u)
                weight = {t: sum(self._edges[t].values()) for t in group}
                groups.append(sorted(group, key=lambda t: (-weight[t], t)))
            self._groups = sorted(groups, key=lambda g: (-len(g), g[0]))
        return self._groups

    def other_relation(self, prompt: str, subject: str | None, index: int, fitted: bool = False) -> str | None:
        """A question about the same subject from another group of templates (a relation the prompt is not).

        Deterministic in ``index``: the groups other than the prompt's are taken in turn, each by its
        most frequent template. None without a subject or when the bank has a single group. ``fitted``: the
        question will be fitted to produce a target, so it is a rewording role: none the blocklist blocks.
        """
        if not subject:
            return None
        own = template_of(prompt, subject)
        others = [g for g in self.groups() if own not in g]
        if fitted:
            others = [kept for g in others if (kept := [t for t in g if not self.blocklist.template_blocked(t)])]
        if not others:
            return None
        group = others[index % len(others)]
        q = group[(index // len(others)) % len(group)].replace("{}", subject, 1)
        return None if fitted and self.blocklist.text_blocked(q) else q

    def variants(self, prompt: str, subject: str | None, n: int, target: str | None = None) -> list[str]:
        """Up to ``n`` rewordings of ``prompt``: its model-written rewordings (``rewordings``), then its
        template's most frequent partners with the subject filled in.

        Rewordings that are the prompt of an edit with another target than ``target``, and rewordings the
        blocklist blocks, are skipped.
        """
        if n <= 0:
            return []
        t = template_of(prompt, subject or "")
        learned = [u.replace("{}", subject, 1) for u in self.neighbours(t)] if t is not None else []
        out, seen = [], {norm_text(prompt)}
        for v in [*self.rewordings.get(prompt, ()), *learned]:
            if norm_text(v) in seen or self._taken.get(v, set()) - {target} or self.blocklist.blocks_rewording(v, subject):
                continue
            seen.add(norm_text(v))
            out.append(v)
            if len(out) == n:
                break
        return out
