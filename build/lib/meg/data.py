"""The raw fact sets: shipped inside the package, restored into ``data/`` (tracked by data.dvc)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

PACKAGED = Path(__file__).parent / "datasets"


def _same(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and (
        hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    )


def restore_raw_data(dest: str | Path = "data") -> int:
    """Copy the packaged raw fact sets into ``dest`` (byte for byte); returns files written."""
    dest = Path(dest)
    written = 0
    for src in sorted(PACKAGED.rglob("*")):
        if not src.is_file() or "__pycache__" in src.parts:
            continue
        target = dest / src.relative_to(PACKAGED)
        if _same(src, target):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(target)
        target.chmod(0o444)
        written += 1
    return written
