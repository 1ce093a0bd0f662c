"""Micro-batching: questions from concurrent callers answered together in one batched pass.

Callers ``submit`` a list of questions and get a future. One worker thread takes the oldest waiting
request, then keeps gathering requests for up to ``max_wait_ms`` (or until ``max_batch_size``
questions are together), runs the answer function ONCE on all their questions, and hands every
caller its own slice of the result. A request is never split across passes: the service caps a
request at ``max_batch_size`` questions.

The queue is bounded by questions waiting (not requests): past ``max_queue`` a submit raises
``QueueFull`` at once (the service answers 503), so a burst costs callers a retry, not memory.

A request may carry ``options`` (e.g. its token limit and stop texts); the answer function then gets
them, one per question, as a third argument. Requests whose options have different ``group`` values
(e.g. chat turns and raw completions) never share a pass: the worker takes the oldest request and
gathers only requests of its group.

Each request fails alone: when a pass of several requests raises, every request of it is run again
on its own, so only the request that cannot be answered gets the error. If the worker itself dies
(an error outside the answer function), every waiting request fails, ``alive`` turns False and
``submit`` refuses new requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from meg.errors import ConfigError

log = logging.getLogger("meg.batcher")

# answer function: (questions, explain flag per question[, options per question]) -> a tuple of lists, one
# item per question: (answers, explanation or None per question[, details per question])
AnswerRows = Callable[..., tuple[list, ...]]


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
    questions: list
    explain: bool
    options: Any = None
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> Hashable:
        return getattr(self.options, "group", None)


@dataclass
class BatchStats:
    batches: int = 0  # batched passes run
    questions: int = 0  # questions answered
    largest: int = 0  # most questions in one pass
    rejected: int = 0  # submits refused because the queue was full
    busy_seconds: float = 0.0  # time spent inside the answer function
    failed_passes: int = 0  # passes of several requests that raised (their requests were run again one by one)
    failed_requests: int = 0  # requests that got an error

    def as_dict(self) -> dict:
        mean = self.questions / self.batches if self.batches else 0.0
        return {"batches": self.batches, "questions": self.questions, "mean_batch_size": round(mean, 3),
                "largest_batch": self.largest, "rejected": self.rejected,
                "busy_seconds": round(self.busy_seconds, 3), "failed_passes": self.failed_passes,
                "failed_requests": self.failed_requests}


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
        self.died: BaseException | None = None  # what stopped the worker, if it stopped on its own

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

    @property
    def alive(self) -> bool:
        """The worker is running and answering."""
        return self._thread is not None and self._thread.is_alive() and self.died is None

    # ---- callers

    def submit(self, questions: list, explain: bool = False, options: Any = None) -> Future:
        """Queue a request; the future resolves to the answer function's lists, sliced to this request.

        ``options`` (None: none) are passed to the answer function once per question of this request."""
        if not questions:
            raise ValueError("submit: no questions")
        if len(questions) > self.cfg.max_batch_size:
            raise ValueError(f"submit: {len(questions)} questions, more than max_batch_size "
                             f"{self.cfg.max_batch_size}")
        job = _Job(list(questions), bool(explain), options)
        with self._cond:
            if self._stop:
                raise RuntimeError("the service is shutting down")
            if self.died is not None:
                raise RuntimeError("the batching worker has stopped")
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
            group = self._jobs[0].group
            batch, rest, size = [], deque(), 0
            while self._jobs:
                job = self._jobs.popleft()
                if job.group == group and size + len(job.questions) <= self.cfg.max_batch_size:
                    batch.append(job)
                    size += len(job.questions)
                else:
                    rest.append(job)
                    if job.group == group:  # the batch is full: later requests keep their order
                        break
            rest.extend(self._jobs)
            self._jobs = rest
            self._waiting -= size
            return batch

    def _run(self) -> None:
        batch: list[_Job] = []
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    return
                batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
                if not batch:
                    continue
                try:
                    self._answer(batch)
                except Exception:  # a pass of several requests: run each alone, so only the bad one fails
                    self.stats.failed_passes += 1
                    for job in batch:
                        try:
                            self._answer([job])
                        except Exception as e:
                            self.stats.failed_requests += 1
                            job.future.set_exception(e)
                batch = []
        except BaseException as e:  # the worker dies: no request may wait for it forever
            self.died = e
            with self._cond:
                pending = [job for job in batch if not job.future.done()] + list(self._jobs)
                self._jobs.clear()
                self._waiting = 0
            for job in pending:
                if not job.future.done():
                    job.future.set_exception(RuntimeError("the batching worker has stopped"))
            log.critical("the batching worker stopped: %s: %s", type(e).__name__, e, exc_info=e)

    def _answer(self, batch: list[_Job]) -> None:
        """One pass over the batch's questions; every job gets its slice of every result list. A pass of one
        job that raises sets its error; a pass of several raises, for ``_run`` to retry them one by one."""
        questions = [q for job in batch for q in job.questions]
        flags = [job.explain for job in batch for _ in job.questions]
        args = [questions, flags]
        if any(job.options is not None for job in batch):
            args.append([job.options for job in batch for _ in job.questions])
        t0 = time.perf_counter()
        try:
            result = self.answer_rows(*args)
        except Exception as e:
            if len(batch) > 1:
                raise
            self.stats.failed_requests += 1
            batch[0].future.set_exception(e)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.questions += len(questions)
        self.stats.largest = max(self.stats.largest, len(questions))
        start = 0
        for job in batch:
            end = start + len(job.questions)
            job.future.set_result(tuple(part[start:end] for part in result))
            start = end
