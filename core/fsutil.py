"""Small filesystem helpers shared across the packages (no torch import): atomic writes, fsync of a folder
tree, file SHA-256 and an exclusive ``flock`` lock.

Atomic writes follow the usual POSIX recipe: write a hidden temporary sibling (same folder, so same
filesystem), flush and ``fsync`` it, then ``os.replace`` it onto the final name; readers see the old file or
the new one, never half of one, and a failed write leaves neither a temporary file nor a changed target.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

HASH_CHUNK_BYTES = 1 << 20


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


def temporary_sibling(path: Path | str) -> Path:
    """``<folder>/.<name>.<pid>-<thread>.tmp``: where :func:`atomic_write` writes before the rename (hidden,
    so the inbox watcher and folder listings skip it; per process and thread, so two writers never share
    one)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


@contextmanager
def atomic_write(path: Path | str, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing (``mode`` ``"w"`` for text, ``"wb"`` for bytes) and,
    when the ``with`` block ends without an exception, flush, fsync and rename it onto ``path``.

    On any exception (in the block, or ``OSError`` from the write, fsync or rename: disk full, read-only
    folder) the temporary file is removed, ``path`` is left as it was and the exception propagates. The
    folder must exist.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by a failure otherwise


def write_text_atomic(path: Path | str, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`). Raises ``OSError``."""
    with atomic_write(path, encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: Path | str, data: Any, *, indent: int | None = 2, ensure_ascii: bool = True,
                      default: Callable[[Any], Any] | None = str) -> None:
    """Write ``data`` as JSON (plus a final newline) to ``path`` atomically (:func:`atomic_write`).

    ``default`` turns values JSON cannot hold into something it can (``str`` by default: paths, enums).
    Raises ``TypeError``/``ValueError`` from :func:`json.dumps` before anything is written, ``OSError``
    from the filesystem.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii, default=default) + "\n"
    write_text_atomic(path, text)


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks. Raises ``OSError``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class LockHeld(BlockingIOError):
    """Another process (or another open of the lock file in this one) holds the lock."""


class ExclusiveLock:
    """An exclusive, advisory ``flock(2)`` lock on ``path`` (created, mode 0644, with its folder).

    The kernel drops it when the holder's file descriptor closes, so a killed process never leaves a stale
    lock. Two opens of the same file exclude each other even within one process. Use as a context manager
    (raises :class:`LockHeld` when taken elsewhere) or call :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        """The open lock file's descriptor (e.g. to write the holder's pid into it). Raises
        ``RuntimeError`` when the lock is not held."""
        if self._fd is None:
            raise RuntimeError(f"the lock {self.path} is not held")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock. Returns False when another holder has it and ``blocking`` is false; waits for it
        otherwise. Raises ``RuntimeError`` when this object holds it already, ``OSError`` when the file
        cannot be created."""
        if self._fd is not None:
            raise RuntimeError(f"the lock {self.path} is held already")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> ExclusiveLock:
        if not self.acquire():
            raise LockHeld(f"{self.path} is locked by another process")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
