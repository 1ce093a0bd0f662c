"""The versioned fact store: new facts, one file per addition, under ``data/facts/``.

Each ``meg facts add FILE`` that brings something new writes ``NNNN-<name>.jsonl`` (canonical JSONL,
``EditRequest.to_dict`` per line, written atomically) with the next free number. Files are never
changed afterwards; the store is read in file order and later facts override earlier ones on the same
(normalised) prompt, as ``meg.facts.resolve`` does. An addition holds the store's lock (``FactStore.locked``)
from reading the current edit set to writing its file, so two additions at once run one after the other, and
a file is never written over another. The data directory holding the store is
versioned by DVC (data.dvc); updating data.dvc is the CLI's job, not this module's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from meg import facts
from meg.errors import FactProblem, FactsError

_NAME = re.compile(r"^(\d{4})-[\w.-]+\.jsonl$")


@dataclass
class AddReport:
    """What adding a fact file did (``written`` is None when nothing was new)."""

    source: str
    written: Path | None
    n_read: int  # facts in the file after its own de-duplication
    n_new: int  # prompts the current edit set does not have
    n_override: int  # prompts it has, with another target (the new fact wins)
    n_duplicate: int  # prompts it has with the same target (nothing to do)
    notes: list[str] = field(default_factory=list)


def _slug(name: str) -> str:
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "facts"
    return slug[:60]


class FactStore:
    """The store directory; ``load`` gives its facts in order (not yet resolved)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_file() and _NAME.match(p.name))

    def load(self) -> list[facts.EditRequest]:
        out: list[facts.EditRequest] = []
        for path in self.files():
            out.extend(facts.read_facts(path, "jsonl"))
        return out

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0):
        """Hold the store's exclusive lock: an advisory lock on the directory that holds the store (so no lock file
        joins the data, and a rejected addition leaves no empty store behind); waits up to ``timeout`` seconds for
        another holder, then raises FactsError."""
        import fcntl

        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root.parent, os.O_RDONLY)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FactsError([FactProblem(str(self.root), None, "lock",
                                                      f"another addition has held the fact store for {timeout:g} s; "
                                                      "try again when it is done")]) from None
                    time.sleep(0.05)
            yield self
        finally:
            os.close(fd)  # releases the lock

    def next_path(self, source: str | Path) -> Path:
        numbers = [int(_NAME.match(p.name).group(1)) for p in self.files()]
        return self.root / f"{max(numbers, default=0) + 1:04d}-{_slug(Path(source).stem)}.jsonl"

    def add(self, source: str | Path, current: list[facts.EditRequest], fmt: str = "auto") -> AddReport:
        """Validate ``source`` and store its facts that change ``current`` (the edit set as of now).

        Raises FactsError listing every problem (the store is left unchanged): bad records, or an
        explicit id already used in ``current`` for another prompt.
        """
        report = facts.validate_file(source, fmt)
        if report.problems:
            raise FactsError(report.problems)
        new = facts.read_facts(source, fmt)
        by_prompt = {facts.normalise_prompt(e.prompt): e for e in current}
        by_id = {e.id: e for e in current}
        problems = []
        counts = {"new": 0, "override": 0, "duplicate": 0}
        keep = []
        for e in new:
            old_same_id = by_id.get(e.id)
            if old_same_id is not None and facts.normalise_prompt(old_same_id.prompt) != facts.normalise_prompt(e.prompt):
                _, _, rec = e.source.rpartition(":record ")
                problems.append(FactProblem(str(source), int(rec) if rec.isdigit() else None, "id",
                                            f"'{e.id}' is already used by {old_same_id.source or 'the edit set'} "
                                            f"for another prompt ({old_same_id.prompt!r})"))
                continue
            old = by_prompt.get(facts.normalise_prompt(e.prompt))
            kind = "new" if old is None else ("duplicate" if old.target_new == e.target_new else "override")
            counts[kind] += 1
            if kind != "duplicate":
                keep.append(e)
        if problems:
            raise FactsError(problems)
        written = self._write(keep, source) if keep else None
        return AddReport(str(source), written, len(new), counts["new"], counts["override"], counts["duplicate"],
                         report.notes)

    def _write(self, edits: list[facts.EditRequest], source: str | Path) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.next_path(source)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for e in edits:
                    f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            while True:  # a hard link never replaces a file: a number taken meanwhile moves this one on
                try:
                    os.link(tmp, path)
                    break
                except FileExistsError:
                    path = self.next_path(source)
        finally:  # also on a full disk or an interrupt: the store keeps only complete files
            tmp.unlink(missing_ok=True)
        return path
