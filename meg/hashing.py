"""sha256 of files, read in blocks: the one place every content hash in meg reads files."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 22


def update_from_file(h: "hashlib._Hash", path: Path) -> None:
    """Feed the bytes of ``path`` into the hash ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    update_from_file(h, path)
    return h.hexdigest()
