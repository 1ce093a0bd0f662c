"""The micro-batcher with a plain answer function: gathering, slicing, limits, failures, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from meg.batcher import BatchConfig, Batcher, QueueFull
from meg.errors import ConfigError


class Recorder:
    """Answers 'q' with 'q!' and records the questions of every pass; can be held at a gate."""

    def __init__(self):
        self.passes: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, questions, explain):
        self.entered.set()
        self.gate.wait(10)
        self.passes.append(list(questions))
        return [q + "!" for q in questions], [{"q": q} if e else None for q, e in zip(questions, explain)]


def test_concurrent_requests_share_one_pass_and_each_gets_its_own_slice():
    rec = Recorder()
    with Batcher(rec, BatchConfig(max_batch_size=64, max_wait_ms=200)) as b:
        with ThreadPoolExecutor(8) as ex:
            futures = list(ex.map(lambda i: b.submit([f"a{i}", f"b{i}"], explain=i % 2 == 0), range(8)))
        results = [f.result(10) for f in futures]
    for i, (answers, expl) in enumerate(results):
        assert answers == [f"a{i}!", f"b{i}!"]
        assert expl == ([{"q": f"a{i}"}, {"q": f"b{i}"}] if i % 2 == 0 else [None, None])
    assert len(rec.passes) < 8  # gathered: fewer passes than requests
    assert b.stats.questions == 16 and b.stats.largest > 2


def test_a_pass_never_exceeds_max_batch_size_and_requests_are_not_split():
    rec = Recorder()
    rec.gate.clear()
    with Batcher(rec, BatchConfig(max_batch_size=5, max_wait_ms=50, max_queue=100)) as b:
        first = b.submit(["x"])
        rec.entered.wait(5)  # the worker holds the first pass; the rest queue up behind it
        futures = [b.submit([f"r{i}-{j}" for j in range(3)]) for i in range(6)]
        rec.gate.set()
        first.result(10)
        for f in futures:
            f.result(10)
    assert max(len(p) for p in rec.passes) <= 5
    for p in rec.passes[1:]:
        owners = [q.split("-")[0] for q in p]
        assert all(owners.count(o) == 3 for o in set(owners))  # a request's 3 questions stay together


def test_full_queue_refuses_at_once():
    rec = Recorder()
    rec.gate.clear()
    with Batcher(rec, BatchConfig(max_batch_size=2, max_wait_ms=0, max_queue=2)) as b:
        running = b.submit(["a"])
        rec.entered.wait(5)
        waiting = b.submit(["b", "c"])
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            b.submit(["d"])
        assert time.monotonic() - t0 < 1.0
        assert b.stats.rejected == 1
        rec.gate.set()
        assert running.result(10)[0] == ["a!"] and waiting.result(10)[0] == ["b!", "c!"]


def test_a_failing_pass_fails_its_callers_and_the_worker_goes_on():
    calls = []

    def flaky(questions, explain):
        calls.append(questions)
        if "boom" in questions:
            raise RuntimeError("model exploded")
        return questions, [None] * len(questions)

    with Batcher(flaky, BatchConfig(max_wait_ms=0)) as b:
        with pytest.raises(RuntimeError, match="model exploded"):
            b.submit(["boom"]).result(10)
        assert b.submit(["fine"]).result(10)[0] == ["fine"]


def test_close_fails_requests_still_waiting():
    rec = Recorder()
    rec.gate.clear()
    b = Batcher(rec, BatchConfig(max_batch_size=1, max_wait_ms=0)).start()
    b.submit(["a"])
    rec.entered.wait(5)
    waiting = b.submit(["b"])
    closer = threading.Thread(target=b.close)
    closer.start()
    while not b._stop:  # open the gate only once close() has begun, so "b" cannot slip into a pass
        time.sleep(0.005)
    rec.gate.set()
    closer.join(10)
    with pytest.raises(RuntimeError, match="shutting down"):
        waiting.result(10)
    with pytest.raises(RuntimeError):
        b.submit(["c"])


def test_bad_requests_and_settings():
    with Batcher(Recorder(), BatchConfig(max_batch_size=2)) as b:
        with pytest.raises(ValueError, match="no questions"):
            b.submit([])
        with pytest.raises(ValueError, match="max_batch_size"):
            b.submit(["a", "b", "c"])
    with pytest.raises(ConfigError, match="'max_batch_size'"):
        BatchConfig(max_batch_size=0)
    with pytest.raises(ConfigError, match="'max_wait_ms'"):
        BatchConfig(max_wait_ms=-1)
    with pytest.raises(ConfigError, match="'max_queue'"):
        BatchConfig(max_batch_size=8, max_queue=4)


class Opt:
    def __init__(self, group, tag):
        self.group, self.tag = group, tag


def test_options_reach_the_answer_function_and_groups_never_share_a_pass():
    passes = []
    gate, entered = threading.Event(), threading.Event()

    def fn(questions, explain, options):
        entered.set()
        gate.wait(10)
        passes.append([(q, o.group) for q, o in zip(questions, options)])
        return [f"{q}:{o.tag}" for q, o in zip(questions, options)], [None] * len(questions), list(questions)

    with Batcher(fn, BatchConfig(max_batch_size=8, max_wait_ms=0)) as b:
        first = b.submit(["x"], options=Opt("chat", "x"))
        entered.wait(5)  # held: the next four queue up together
        chat1 = b.submit(["c1", "c2"], options=Opt("chat", "a"))
        raw = b.submit(["r1"], options=Opt("raw", "b"))
        chat2 = b.submit(["c3"], options=Opt("chat", "c"))
        raw2 = b.submit(["r2"], options=Opt("raw", "d"))
        gate.set()
        assert first.result(10) == (["x:x"], [None], ["x"])
        assert chat1.result(10) == (["c1:a", "c2:a"], [None, None], ["c1", "c2"])  # every list sliced
        assert raw.result(10)[0] == ["r1:b"] and chat2.result(10)[0] == ["c3:c"] and raw2.result(10)[0] == ["r2:d"]
    assert passes[1:] == [[("c1", "chat"), ("c2", "chat"), ("c3", "chat")], [("r1", "raw"), ("r2", "raw")]]


def test_a_failing_pass_is_retried_one_request_at_a_time_so_only_the_bad_one_fails():
    passes = []
    gate, entered = threading.Event(), threading.Event()

    def fn(questions, explain):
        entered.set()
        gate.wait(10)
        passes.append(list(questions))
        if "boom" in questions:
            raise RuntimeError("model exploded")
        return [q + "!" for q in questions], [None] * len(questions)

    with Batcher(fn, BatchConfig(max_batch_size=8, max_wait_ms=0)) as b:
        first = b.submit(["hold"])
        entered.wait(5)
        good1, bad, good2 = b.submit(["a", "b"]), b.submit(["boom"]), b.submit(["c"])
        gate.set()
        assert first.result(10)[0] == ["hold!"]
        assert good1.result(10)[0] == ["a!", "b!"] and good2.result(10)[0] == ["c!"]
        with pytest.raises(RuntimeError, match="model exploded"):
            bad.result(10)
        assert b.stats.failed_passes == 1 and b.stats.failed_requests == 1 and b.alive
    assert passes[1:] == [["a", "b", "boom", "c"], ["a", "b"], ["boom"], ["c"]]


def test_a_dead_worker_fails_waiting_requests_refuses_new_ones_and_says_so():
    gate, entered = threading.Event(), threading.Event()

    def fn(questions, explain):
        entered.set()
        gate.wait(10)
        raise SystemExit("the worker is gone")  # not an Exception: nothing retries it

    b = Batcher(fn, BatchConfig(max_batch_size=1, max_wait_ms=0)).start()
    try:
        running = b.submit(["a"])
        entered.wait(5)
        waiting = b.submit(["b"])
        assert b.alive
        gate.set()
        for f in (running, waiting):
            with pytest.raises(RuntimeError, match="worker has stopped"):
                f.result(10)
        assert not b.alive and isinstance(b.died, SystemExit)
        with pytest.raises(RuntimeError, match="worker has stopped"):
            b.submit(["c"])
    finally:
        b.close()
