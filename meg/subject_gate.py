"""Which edits does a query name? A word-level index of the edits' subjects.

An edit request usually names the entity it is about ("Danielle Darrieux"). A query that does not
mention that entity should not be answered from that edit, however similar its wording ("Michel
Rocard is a native speaker of"). ``SubjectIndex.matches(text)`` returns the edits whose subject
occurs in the text as a run of whole words, compared case-folded with punctuation treated as a word
break (so "Lyon's twin city" names "Lyon"). Edits without a subject match nothing here; the router
treats them by embedding alone.

Lookup is by word n-grams of the query (n up to the longest subject), so it costs the same for ten
edits or ten thousand.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

_BREAK = re.compile(r"[^\w]+")


def words(text: str) -> list[str]:
    """Case-folded words, punctuation and whitespace as separators."""
    return _BREAK.sub(" ", text.casefold()).split()


class SubjectIndex:
    def __init__(self, subjects: Sequence[str | None]):
        self.n = len(subjects)
        self.free: list[int] = []  # edits without a usable subject
        self._by_phrase: dict[str, list[int]] = {}
        self.max_words = 0
        for i, subject in enumerate(subjects):
            ws = words(subject) if subject else []
            if not ws:
                self.free.append(i)
                continue
            self._by_phrase.setdefault(" ".join(ws), []).append(i)
            self.max_words = max(self.max_words, len(ws))

    def matches(self, text: str) -> list[int]:
        """Indices of the edits whose subject the text names, ascending."""
        ws = words(text)
        found: set[int] = set()
        for n in range(1, min(self.max_words, len(ws)) + 1):
            for start in range(len(ws) - n + 1):
                found.update(self._by_phrase.get(" ".join(ws[start : start + n]), ()))
        return sorted(found)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")  # where one sentence ends and the next begins


@functools.lru_cache(maxsize=65536)
def _subject_pattern(subject: str | None) -> re.Pattern | None:
    ws = _BREAK.sub(" ", subject).split() if subject else []
    if not ws:
        return None
    return re.compile(r"(?<!\w)" + r"[^\w]+".join(re.escape(w) for w in ws) + r"(?!\w)", re.IGNORECASE)


def question_start(text: str, subject: str | None) -> int | None:
    """Where the sentence that names ``subject`` last begins in ``text``; None if the text does not name it."""
    pattern = _subject_pattern(subject)
    found = list(pattern.finditer(text)) if pattern else []
    if not found:
        return None
    return max((m.end() for m in SENTENCE_END.finditer(text, 0, found[-1].start())), default=0)


def mask_subject(text: str, subject: str | None, word: str, last_sentence: bool = False) -> str | None:
    """``text`` with every occurrence of ``subject`` replaced by ``word``; None if the text does not name it.

    An occurrence is matched as ``SubjectIndex`` matches one: the subject's words as whole words,
    case-insensitive, any punctuation or whitespace between them ("Lyon's twin city" -> "it's twin city").
    With ``last_sentence``, what comes before the sentence that names the subject last is left out: a
    question's relation is worded from there on ("Some context. Where was X born?" -> "Where was it born?").
    """
    start = question_start(text, subject)
    if start is None:
        return None
    return _subject_pattern(subject).sub(lambda _: word, text[start:] if last_sentence else text)
