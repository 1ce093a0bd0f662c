"""What every stage shares: its result record, atomic file writes, and reading the prepared edits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from meg.errors import BundleError
from meg.hashing import update_from_file


@dataclass
class StageResult:
    """What a stage did: logged as one MLflow run by the caller, summarised on the console."""

    stage: str
    params: dict[str, Any]  # the stage's settings, as dotted keys
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # reports and plots worth keeping with the run
    tags: dict[str, str] = field(default_factory=dict)
    summary: str = ""  # one line for the console
    bundle: Path | None = None  # an edit bundle to log as a model (attach)


def write_json(path: Path, value: Any) -> Path:
    """Write JSON atomically (tmp file + os.replace), so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_metrics(out_dir: Path, metrics: dict[str, float]) -> Path:
    """``metrics.json``: the stage's numbers (a DVC metrics file)."""
    return write_json(Path(out_dir) / "metrics.json", {k: round(float(v), 6) for k, v in metrics.items()})


ABSENT = "absent.json"  # the marker of a placeholder directory


def write_absent(path: Path, why: str) -> Path:
    """A placeholder directory for a part the settings turn off (a DVC output must exist)."""
    path.mkdir(parents=True, exist_ok=True)
    return write_json(path / ABSENT, {"absent": why})


def is_absent(path: Path) -> bool:
    """Whether ``path`` is a placeholder written by ``write_absent``."""
    return (path / ABSENT).exists()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; run the stage that writes it first") from None
    except ValueError as e:
        raise BundleError(f"{path}: corrupted JSON: {e}") from e


def read_edits(path: Path) -> list:
    """Edits written by the prepare stage (EditRequest.to_dict per line)."""
    from meg.facts import EditRequest

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: missing; run the prepare stage first")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(EditRequest.from_dict(json.loads(line)))
                except (ValueError, KeyError) as e:
                    raise BundleError(f"{path}:record {n}: not a prepared edit ({e})") from e
    return out


@contextmanager
def fresh_dir(out: Path) -> Iterator[Path]:
    """Build a directory under a temporary name and put it in place only when the block succeeds."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``root``."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            update_from_file(h, p)
    return h.hexdigest()


def load_base(view: dict):
    """The base model named in the view's ``base`` section, on its device."""
    from meg import lm
    from meg.config import base_config

    base = base_config(view)
    return lm.load_model(base.model, device=base.device)
