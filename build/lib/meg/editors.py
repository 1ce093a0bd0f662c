"""The editors the benchmark and CLI can run, by name."""

from __future__ import annotations

from typing import Callable

from meg.evaluate import Editor, NoEdit


def _ft() -> Editor:
    from meg.baselines.ft import FineTune

    return FineTune()


def _meg() -> Editor:
    from meg.editor import MegEditor

    return MegEditor()


EDITORS: dict[str, Callable[[], Editor]] = {"none": NoEdit, "ft": _ft, "meg": _meg}


def make_editor(name: str) -> Editor:
    if name not in EDITORS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(EDITORS)}")
    return EDITORS[name]()
