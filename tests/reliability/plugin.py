"""Fault bookkeeping for the reliability tests: what was tried, how many cases, and how it ended.

A test names its fault with ``@pytest.mark.fault(category, what, expect)``; a test that tries many
inputs in one call (a hypothesis property, a loop) counts them with ``count()``. Without ``count()``
each test item is one case. ``--fault-log PATH`` writes one JSON row per test item at the end of the
session; ``python -m tests.reliability.report`` turns the rows into docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_counts: dict[str, int] = {}
_rows: dict[str, dict] = {}
_current: list[str] = []  # the node id of the test being run (one at a time)


def count(n: int = 1) -> None:
    """Add ``n`` cases to the test that is running."""
    if _current:
        _counts[_current[0]] = _counts.get(_current[0], 0) + n


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-log", default=None, help="write the fault table rows of this run (JSON) here")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(category, what, expect): the fault a reliability test injects")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    _current[:] = [item.nodeid]
    try:
        yield
    finally:
        _current.clear()


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    """One row per item: the call's outcome, or the setup's or teardown's when that failed."""
    marker = item.get_closest_marker("fault")
    if marker is None or (call.when != "call" and call.excinfo is None):
        return
    category, what, expect = (list(marker.args) + ["", "", ""])[:3]
    if call.excinfo is None:
        outcome = "passed"
    elif call.excinfo.errisinstance(pytest.skip.Exception):
        outcome = "skipped"
    else:
        outcome = "failed" if call.when == "call" else f"error in {call.when}"
    _rows[item.nodeid] = {"test": item.nodeid, "category": category, "what": what, "expect": expect,
                          "outcome": outcome}


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--fault-log", default=None)
    if not path:
        return
    rows = [{**row, "cases": _counts.get(nodeid, 1)} for nodeid, row in _rows.items()]
    Path(path).write_text(json.dumps(rows, indent=1))
