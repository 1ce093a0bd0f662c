"""Micro-batching: questions from concurrent callers answered together in one batched pass.

Callers ``submit`` a list of questions and get a future. One worker thread takes the oldest waiting
request, then keeps gathering requests for up to ``max_wait_ms`` (or until ``max_batch_size``
questions are together), runs the answer function ONCE on all their questions, and hands every
caller its own slice of the result. A request is never split across passes: the service caps a
request at ``max_batch_size`` questions.

The queue is bounded by questions waiting (not requests): past ``max_queue`` a submit raises
``QueueFull`` at once (the service answers 503), so a burst costs callers a retry, not memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from meg.errors import ConfigError

# answer function: (questions, explain flag per question) -> (answers, explanation or None per question)
AnswerRows = Callable[[list[str], list[bool]], tuple[list[str], list[dict | None]]]


@dataclass
class BatchConfig:
    max_batch_size: int = 32  # questions per batched pass at most
    max_wait_ms: float = 5.0  # after the first request of a batch arrives, wait this long for company
    max_queue: int = 256  # questions waiting at most; more -> QueueFull (HTTP 503)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"batch: bad value for '{name}': {value!r} (an integer >= 1)")
        if not isinstance(self.max_wait_ms, (int, float)) or isinstance(self.max_wait_ms, bool) or self.max_wait_ms < 0:
            raise ConfigError(f"batch: bad value for 'max_wait_ms': {self.max_wait_ms!r} (a number >= 0)")
        if self.max_queue < self.max_batch_size:
            raise ConfigError(f"batch: bad value for 'max_queue': {self.max_queue} (at least max_batch_size "
                              f"= {self.max_batch_size}, or a full batch could never wait)")


class QueueFull(Exception):
    """Too many questions are waiting; try again later."""


@dataclass
class _Job:
    questions: list[str]
    explain: bool
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0  # batched passes run
    questions: int = 0  # questions answered
    largest: int = 0  # most questions in one pass
    rejected: int = 0  # submits refused because the queue was full
    busy_seconds: float = 0.0  # time spent inside the answer function

    def as_dict(self) -> dict:
        mean = self.questions / self.batches if self.batches else 0.0
        return {"batches": self.batches, "questions": self.questions, "mean_batch_size": round(mean, 3),
                "largest_batch": self.largest, "rejected": self.rejected,
                "busy_seconds": round(self.busy_seconds, 3)}


class Batcher:
    """A worker thread that answers queued questions in batches; use as a context manager."""

    def __init__(self, answer_rows: AnswerRows, cfg: BatchConfig | None = None):
        self.answer_rows, self.cfg = answer_rows, cfg or BatchConfig()
        self.stats = BatchStats()
        self._jobs: deque[_Job] = deque()
        self._waiting = 0  # questions in self._jobs
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> "Batcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meg-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker; requests still waiting fail with RuntimeError."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            while self._jobs:
                self._jobs.popleft().future.set_exception(RuntimeError("the service is shutting down"))
            self._waiting = 0

    def __enter__(self) -> "Batcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        return self._waiting

    # ---- callers

    def submit(self, questions: list[str], explain: bool = False) -> Future:
        """Queue a request; the future resolves to (answers, explanations or None per question)."""
        if not questions:
            raise ValueError("submit: no questions")
        if len(questions) > self.cfg.max_batch_size:
            raise ValueError(f"submit: {len(questions)} questions, more than max_batch_size "
                             f"{self.cfg.max_batch_size}")
        job = _Job(list(questions), bool(explain))
        with self._cond:
            if self._stop:
                raise RuntimeError("the service is shutting down")
            if self._waiting + len(job.questions) > self.cfg.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self._waiting} questions are waiting (at most {self.cfg.max_queue})")
            self._jobs.append(job)
            self._waiting += len(job.questions)
            self._cond.notify_all()
        return job.future

    # ---- worker

    def _take_batch(self) -> list[_Job] | None:
        """Block for the first job, then gather more until the batch is full or the wait is over."""
        with self._cond:
            while not self._jobs and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000.0
            while self._waiting < self.cfg.max_batch_size and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self._jobs and size + len(self._jobs[0].questions) <= self.cfg.max_batch_size:
                job = self._jobs.popleft()
                batch.append(job)
                size += len(job.questions)
            self._waiting -= size
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            questions = [q for job in batch for q in job.questions]
            flags = [job.explain for job in batch for _ in job.questions]
            t0 = time.perf_counter()
            try:
                answers, explanations = self.answer_rows(questions, flags)
            except Exception as e:  # every caller of the pass learns what went wrong
                for job in batch:
                    job.future.set_exception(e)
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.questions += len(questions)
            self.stats.largest = max(self.stats.largest, len(questions))
            start = 0
            for job in batch:
                end = start + len(job.questions)
                job.future.set_result((answers[start:end], explanations[start:end]))
                start = end
