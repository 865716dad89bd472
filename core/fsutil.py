"""Small filesystem helpers shared by checkpoints and the vault (no torch import)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folder itself, so a following rename publishes complete
    data. Raises ``OSError`` as the OS reports it."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
