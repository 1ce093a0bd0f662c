"""Two additions to the fact store at once: one waits for the other, and no file is written over another."""

from __future__ import annotations

import json
import threading

import pytest

from meg.errors import FactsError
from meg.factstore import FactStore


def fact_file(path, prompt: str, target: str):
    path.write_text(json.dumps({"prompt": prompt, "target_new": target, "subject": prompt.split()[0]}) + "\n")
    return path


def test_a_held_lock_makes_a_second_addition_wait_then_give_up(tmp_path):
    store = FactStore(tmp_path / "facts")
    with store.locked():
        with pytest.raises(FactsError, match="another addition has held the fact store"):
            with FactStore(tmp_path / "facts").locked(timeout=0.2):
                pass
    with store.locked(timeout=0.2):  # released: free again
        pass


def test_the_second_holder_gets_the_lock_once_the_first_lets_go(tmp_path):
    store = FactStore(tmp_path / "facts")
    order = []
    first_in = threading.Event()

    def first():
        with store.locked():
            first_in.set()
            order.append("first in")
            threading.Event().wait(0.3)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with FactStore(tmp_path / "facts").locked(timeout=10):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_a_number_taken_meanwhile_moves_the_new_file_on(tmp_path, monkeypatch):
    store = FactStore(tmp_path / "facts")
    a = store.add(fact_file(tmp_path / "a.jsonl", "Ann speaks", "Welsh"), [])
    stale = a.written  # what next_path would have said before ``a`` was written
    calls = []
    real = FactStore.next_path

    def racing(self, source):
        calls.append(source)
        return stale if len(calls) == 1 else real(self, source)

    monkeypatch.setattr(FactStore, "next_path", racing)
    b = store.add(fact_file(tmp_path / "b.jsonl", "Bob speaks", "Dutch"), [])
    assert b.written != a.written and b.written.name.startswith("0002-")
    assert "Welsh" in a.written.read_text() and "Dutch" in b.written.read_text()
    assert not list(store.root.glob(".*.tmp"))
