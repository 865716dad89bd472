"""Files behind the quests page: safe upload into the inbox, record previews and validation reports.

No Flask here (the blueprint in :mod:`tavern.pages.quests` maps errors to HTTP statuses), so every rule is
testable on plain folders:

- :func:`check_upload_name` accepts a bare file name with a quest file suffix (:data:`core.containers.ACCEPTED_SUFFIXES`:
  ``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``, gzip'd where usual) and nothing else;
- :func:`save_upload` writes ``inbox/<priority>/.upload-<random>.part`` (a name the daemon ignores), then
  links it to the final name without ever overwriting: an existing ``data.jsonl`` makes ``data-2.jsonl``;
- :func:`read_preview` returns the first lines of a JSON Lines file (plain or gzip) within fixed byte budgets,
  or the first records of any other container, read by :func:`core.containers.iter_items` (as training does);
- :func:`read_report` loads a ``.report.json`` and shortens long lists for display.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import stat
import uuid
from pathlib import Path
from typing import IO, Any

from core import containers
from core.formats import CorruptFileError
from core.ingest import is_temporary_name, priority_for
from core.realm import PRIORITIES
from core.sources import publish_new

ACCEPTED_SUFFIXES = containers.ACCEPTED_SUFFIXES
MAX_NAME_BYTES = 200
PREVIEW_LINES = 5
PREVIEW_LINE_CHARS = 2000
PREVIEW_BUDGET_BYTES = 1 << 20  # decompressed bytes read at most for one preview
REPORT_MAX_BYTES = 8 << 20
REPORT_LIST_ITEMS = 200
_COPY_CHUNK_BYTES = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = "\ufeff"


class UploadError(ValueError):
    """A refused upload. ``status`` is the HTTP status to answer (400 bad name/priority, 413 too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_upload_name(name: str | None) -> str:
    """Return ``name`` if it is a bare, visible quest file name (:data:`ACCEPTED_SUFFIXES`); raise :class:`UploadError`.

    Refused: empty, path separators (``/``, ``\\``), ``..``, control characters, a leading ``.`` (the daemon
    ignores hidden files), more than :data:`MAX_NAME_BYTES` UTF-8 bytes, any other extension. Characters
    such as ``<`` or quotes are allowed: names are data and are escaped wherever they are shown.
    """
    if not name or not name.strip():
        raise UploadError("the upload has no file name")
    if "/" in name or "\\" in name:
        raise UploadError("the file name must be a bare name, without folders or path separators")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UploadError("the file name contains control characters")
    if name.startswith("."):
        raise UploadError("the file name must not start with '.' (hidden files are ignored by the inbox)")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise UploadError(f"the file name is longer than {MAX_NAME_BYTES} bytes")
    lower = name.lower()
    if not lower.endswith(ACCEPTED_SUFFIXES) or lower in ACCEPTED_SUFFIXES:
        raise UploadError(f"quests are {containers.ACCEPTED_NAMES} files")
    return name


def save_upload(stream: IO[bytes], name: str, priority: str, inbox: Path, max_bytes: int) -> Path:
    """Copy ``stream`` into ``inbox/<priority>/`` under ``name`` (or a suffixed name); return the path.

    The bytes go to a hidden ``.part`` file first and appear under their final name in one step, so the
    daemon never reads half an upload. Raises :class:`UploadError` for a bad name or priority (400) or
    more than ``max_bytes`` bytes (413; nothing is left behind).
    """
    check_upload_name(name)
    if priority not in PRIORITIES:
        raise UploadError(f"priority must be one of {', '.join(PRIORITIES)}")
    folder = inbox / priority
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{uuid.uuid4().hex}.part"
    try:
        written = 0
        with open(tmp, "xb") as out:
            while chunk := stream.read(_COPY_CHUNK_BYTES):
                written += len(chunk)
                if written > max_bytes:
                    raise UploadError(f"the file is larger than the upload limit of {max_bytes} bytes "
                                      "(tavern.max_upload_bytes)", status=413)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        try:  # never overwrites: an existing data.jsonl makes data-2.jsonl
            return publish_new(tmp, folder, name)
        except FileExistsError as exc:
            raise UploadError(str(exc), status=409) from None
    finally:
        tmp.unlink(missing_ok=True)


def list_inbox(inbox: Path) -> list[dict[str, Any]]:
    """Files waiting in the inbox (not yet taken by the daemon): ``name``, ``priority``, ``size_bytes``.

    Hidden and temporary files (uploads in progress) are left out and priorities are read the daemon's way
    (:func:`core.ingest.is_temporary_name`, :func:`core.ingest.priority_for`).
    """
    out = []
    for folder in (inbox, *(inbox / p for p in PRIORITIES)):
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for entry in it:
                if is_temporary_name(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
                priority = priority_for(Path(entry.path), inbox)
                out.append({"name": entry.name, "priority": priority, "size_bytes": size})
    return sorted(out, key=lambda r: (r["priority"], r["name"]))


def _open_binary(path: Path) -> IO[bytes]:
    """``path`` opened for reading, decompressed when it starts with the gzip magic; closed by the caller
    (``gzip.open`` owns its file, where ``GzipFile(fileobj=...)`` would leave it open). Raises ``OSError``
    for anything but a regular file (a FIFO would block ``open()``; a folder cannot be read)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (the daemon rejected it as such)")
    with open(path, "rb") as raw:
        head = raw.read(2)
    return gzip.open(path, "rb") if head == _GZIP_MAGIC else open(path, "rb")  # noqa: SIM115


def read_preview(path: Path, lines: int = PREVIEW_LINES) -> dict[str, Any]:
    """The first ``lines`` records of a quest file: the raw lines of JSON Lines (plain or gzip, detected by
    magic bytes), else the first records of its container as JSON (:func:`core.containers.iter_items`).

    Returns ``{"lines": [{"number": int (1-based), "text": str, "truncated": bool}], "problem": str|None,
    "container": str|None}``; ``number`` is the record number of the container (a JSONL line, a CSV data row,
    a JSON array position...). Each text is at most :data:`PREVIEW_LINE_CHARS` characters, decoded as UTF-8
    with replacement; at most :data:`PREVIEW_BUDGET_BYTES` decompressed bytes are read from a JSONL file, so
    a huge line or a gzip bomb costs little (another container's record counts as unreadable past that size).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (the daemon rejected it as such)")
        container = containers.detect(path, path.name)
    except FileNotFoundError:
        return {"lines": [], "problem": "the file is no longer there", "container": None}
    except OSError as exc:
        return {"lines": [], "problem": f"cannot read the file: {exc.strerror or exc}", "container": None}
    except (containers.Unsupported, CorruptFileError) as exc:
        container = None
        if path.name.lower().endswith((".parquet",)):
            return {"lines": [], "problem": str(exc), "container": None}
    if container in (None, containers.JSONL):
        return {**_read_lines(path, lines), "container": container}
    out: list[dict[str, Any]] = []
    items = containers.iter_items(path, container, max_line_bytes=PREVIEW_BUDGET_BYTES)
    try:
        for number, record, error, _ in items:
            if len(out) >= lines:
                break
            text = error if error is not None else json.dumps(record, ensure_ascii=False, default=str)
            out.append({"number": number, "text": text[:PREVIEW_LINE_CHARS],  # type: ignore[index]
                        "truncated": len(text) > PREVIEW_LINE_CHARS})  # type: ignore[arg-type]
    except (OSError, CorruptFileError) as exc:
        return {"lines": out, "problem": f"the file cannot be read past record {len(out)}: {exc}",
                "container": container}
    finally:
        items.close()
    return {"lines": out, "problem": None, "container": container}


def _read_lines(path: Path, lines: int) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    try:
        f = _open_binary(path)
    except FileNotFoundError:
        return {"lines": out, "problem": "the file is no longer there"}
    except OSError as exc:
        return {"lines": out, "problem": f"cannot read the file: {exc.strerror or exc}"}
    budget = PREVIEW_BUDGET_BYTES
    limit = PREVIEW_LINE_CHARS * 4 + 1  # UTF-8 bytes enough for PREVIEW_LINE_CHARS characters
    try:
        with f:
            while len(out) < lines and budget > 0:
                want = min(limit, budget)
                chunk = f.readline(want)
                if not chunk:
                    break
                budget -= len(chunk)
                truncated = False
                if not chunk.endswith(b"\n") and len(chunk) == want:  # over-long line: skip its rest
                    truncated = True
                    while budget > 0:
                        rest = f.readline(min(1 << 16, budget))
                        budget -= len(rest)
                        if not rest or rest.endswith(b"\n"):
                            break
                text = chunk.decode("utf-8", errors="replace").rstrip("\r\n")
                if not out and text.startswith(_BOM):
                    text = text[1:]
                out.append({"number": len(out) + 1, "text": text[:PREVIEW_LINE_CHARS],
                            "truncated": truncated or len(text) > PREVIEW_LINE_CHARS})
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        return {"lines": out, "problem": f"the file cannot be read past line {len(out)}: {exc}"}
    return {"lines": out, "problem": None}


def _shorten(value: Any, depth: int = 0) -> Any:
    if isinstance(value, list) and len(value) > REPORT_LIST_ITEMS:
        return [_shorten(v, depth + 1) for v in value[:REPORT_LIST_ITEMS]] + [
            f"... {len(value) - REPORT_LIST_ITEMS} more not shown (see the report file)"]
    if isinstance(value, list):
        return [_shorten(v, depth + 1) for v in value]
    if isinstance(value, dict) and depth < 8:
        return {k: _shorten(v, depth + 1) for k, v in value.items()}
    return value


def read_report(path: Path) -> dict[str, Any]:
    """A validation report for display: ``{"report": dict|None, "problem": str|None}``.

    Lists longer than :data:`REPORT_LIST_ITEMS` (bad lines of a rejected file) are cut with a note; a
    report over :data:`REPORT_MAX_BYTES` is not parsed.
    """
    try:
        size = path.stat().st_size
        if size > REPORT_MAX_BYTES:
            return {"report": None, "problem": f"the report is {size} bytes, too large to show here; "
                    f"read {path.name} in the queue folder"}
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"report": None, "problem": "no validation report (the file was not validated yet, or "
                "validation could not open it)"}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"report": None, "problem": f"the report cannot be read: {exc}"}
    if not isinstance(data, dict):
        return {"report": None, "problem": "the report is not a JSON object"}
    return {"report": _shorten(data), "problem": None}
