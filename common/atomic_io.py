"""Writes that never leave a half-written file behind: to a temporary name beside the target, then
``os.replace`` (atomic on POSIX and Windows), so a crash or a reader in another process sees either
the old file or the new one. Generic file handling only: no patient data is read here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` of ``arrays`` to ``path`` (which should end in .npz), atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return atomic_write(path, write)
