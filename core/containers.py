"""Quest file containers: how records are stored in a file, detected and streamed in one place.

A *container* is the file's layout; the record *format* (:mod:`core.formats`) is what each record holds.

==============  =======================  ==============================================  ==========================
container       file names               one record is                                   record number
==============  =======================  ==============================================  ==========================
``jsonl``       ``.jsonl`` ``.ndjson``   one JSON object per line (also a ``.json``       the physical line (1-based)
                                         file whose first line is a whole JSON object)
``json``        ``.json``                one element of a top-level JSON array, streamed  the element's position
                                         with ijson (never the whole array in memory)     (1-based: record 1 = ``[0]``)
``csv``/``tsv`` ``.csv`` ``.tsv``        one row under a header row (comma / tab)         the data row (1-based, the
                                                                                          header not counted)
``parquet``     ``.parquet``             one row, read by batches of row groups           the row (1-based)
                                         (pyarrow)
``txt``         ``.txt``                 a paragraph: lines up to a blank line, as        the paragraph's first line
                                         ``{"text": paragraph}``
``transcript``  ``.txt`` starting with   a blank-line-separated block of ``Q:``/``A:``    the block's first line
                a speaker tag            or ``User:``/``Assistant:`` turns, as
                                         ``{"messages": [...]}``
==============  =======================  ==============================================  ==========================

``.gz`` is accepted after ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` and ``.txt`` (detected by the magic
bytes; a name/content mismatch is refused). Parquet compresses inside, so ``.parquet.gz`` is refused.

**CSV/TSV cells are strings** (``csv`` module, UTF-8 with an optional BOM, RFC 4180 quoting, fields may hold
newlines). Columns with an empty header name (a pandas index) are ignored; duplicate names refuse the file;
a row with more or fewer fields than the header, or with bytes that are not UTF-8, is a bad record (a header
that is not UTF-8 refuses the file). After ``field_map``, a cell of a column
that holds structured data is read as JSON (:func:`core.formats.decode_json_cells`): ``messages``,
``conversations``, ``history`` always (an empty cell is null); ``prompt``, ``completion``, ``chosen``,
``rejected`` when the cell is a JSON array of message objects (``[{"role": ..., "content": ...}]``), and as a
string otherwise.

**Plain text** (``txt``): paragraphs are separated by one or more blank (or whitespace-only) lines; a
paragraph's lines are joined with ``\\n`` (line ends normalized). A paragraph longer than
``validation.max_line_bytes`` or with a line that is not UTF-8 (or holds NUL bytes) is a bad record.

**Transcripts**: a ``.txt`` file whose first non-blank line starts with a speaker tag. Each blank-line-
separated block is one conversation; a line starting with ``Q:``, ``User:`` or ``Human:`` starts a user turn,
``A:`` or ``Assistant:`` an assistant turn, ``System:`` a system message (tags are case-insensitive, one
optional space after the colon is dropped); other lines continue the current turn. Text before the first
tag is a bad record.

Everything that reads a quest's records -- validation, the trainer (:func:`core.records.trainable_records`),
``eval``, the Tavern's preview -- goes through :func:`iter_items` and :func:`parse_item`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, NamedTuple

from core.formats import (
    GZIP_MAGIC,
    UTF8_BOM,
    CorruptFileError,
    HashingReader,
    RecordError,
    is_gzip,
    open_text_lines,
    parse_line,
    parse_record,
)

JSONL, JSON, CSV, TSV, PARQUET, TXT, TRANSCRIPT = "jsonl", "json", "csv", "tsv", "parquet", "txt", "transcript"
CONTAINERS = (JSONL, JSON, CSV, TSV, PARQUET, TXT, TRANSCRIPT)

#: The word a report uses for one record's number, per container.
RECORD_UNIT = {JSONL: "line", JSON: "record", CSV: "row", TSV: "row", PARQUET: "row", TXT: "line",
               TRANSCRIPT: "line"}
#: What the numbers in a report mean, per container (written into the report).
NUMBERING = {
    JSONL: "record numbers are physical line numbers (1-based)",
    JSON: "record numbers are positions in the JSON array (1-based: record 1 is element [0])",
    CSV: "record numbers are data rows (1-based; the header row is not counted, so row N is spreadsheet row N+1)",
    TSV: "record numbers are data rows (1-based; the header row is not counted, so row N is spreadsheet row N+1)",
    PARQUET: "record numbers are rows (1-based, across row groups)",
    TXT: "record numbers are the line where each paragraph starts (1-based)",
    TRANSCRIPT: "record numbers are the line where each conversation block starts (1-based)",
}
SUFFIXES = {".jsonl": JSONL, ".ndjson": JSONL, ".json": JSON, ".csv": CSV, ".tsv": TSV, ".parquet": PARQUET,
            ".txt": TXT}
#: Suffixes accepted with a ``.gz`` after them.
GZIP_OK = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt")
ACCEPTED_NAMES = ".jsonl, .json, .csv, .tsv, .parquet, .txt (and .gz of all but .parquet)"
ACCEPTED_SUFFIXES = tuple(SUFFIXES) + tuple(s + ".gz" for s in GZIP_OK)

PARQUET_MAGIC = b"PAR1"
PARQUET_BATCH_ROWS = 1024
_CHUNK = 1 << 20
_HEAD_BYTES = 64 * 1024
_SPEAKER = re.compile(r"^(q|a|user|assistant|human|system)[ \t]*:[ ]?", re.IGNORECASE)
_SPEAKER_ROLES = {"q": "user", "user": "user", "human": "user", "a": "assistant", "assistant": "assistant",
                  "system": "system"}


class Item(NamedTuple):
    """One record as read from its container: ``number`` (see :data:`NUMBERING`), ``record`` (a JSON
    text for ``jsonl``, a dict otherwise; None with ``error``), ``error`` (why the record cannot be read)
    and ``size`` (its approximate size in bytes)."""

    number: int
    record: str | dict | None
    error: str | None
    size: int


class CsvRow(dict):
    """A CSV/TSV row (``{column: str}``): its JSON columns are decoded after ``field_map``."""


class Unsupported(ValueError):
    """The file as a whole is not a quest file this module reads; ``str(exc)`` says why and what to do."""


def split_suffix(name: str) -> tuple[str, bool]:
    """``(".csv", True)`` for ``data.CSV.gz``: the lower-case suffix before an optional ``.gz``."""
    lower = name.lower()
    gz = lower.endswith(".gz")
    base = lower[:-3] if gz else lower
    dot = base.rfind(".")
    return (base[dot:] if dot > 0 else ""), gz


def _peek(path: Path, size: int = _HEAD_BYTES) -> bytes:
    """The first bytes of the (decompressed) content, a UTF-8 BOM removed. Raises ``OSError`` and
    :class:`CorruptFileError` (broken gzip)."""
    try:
        with open(path, "rb") as f:
            stream: IO[bytes] = gzip.GzipFile(fileobj=f) if f.read(2) == GZIP_MAGIC else f
            f.seek(0)
            head = stream.read(size)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CorruptFileError(f"broken gzip stream: {exc}") from None
    return head[3:] if head.startswith(UTF8_BOM) else head


def _looks_utf16(head: bytes) -> bool:
    head = head.lstrip()
    return head.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(head) >= 4 and (head[1] == head[3] == 0 or head[0] == head[2] == 0))


def detect(path: Path, name: str) -> str:
    """The container of the file at ``path`` whose user-facing name is ``name`` (see the module doc).

    Raises :class:`Unsupported` with the reason (unknown suffix, gzip name/content mismatch, UTF-16, binary
    data in a text file, not a Parquet file, a JSON value that is not an array of records),
    :class:`CorruptFileError` for a broken gzip stream, ``OSError`` when the file cannot be read.
    """
    suffix, named_gz = split_suffix(name)
    container = SUFFIXES.get(suffix)
    if container is None:
        shown = "".join(Path(name).suffixes[-2:]) or "(none)"
        raise Unsupported(f"unsupported file type '{shown}': quests are {ACCEPTED_NAMES}")
    compressed = is_gzip(path)
    if container == PARQUET:
        if named_gz or compressed:
            raise Unsupported("a gzip-compressed Parquet file: Parquet compresses inside; drop the .parquet itself")
        with open(path, "rb") as f:
            if f.read(4) != PARQUET_MAGIC:
                raise Unsupported("not a Parquet file (no PAR1 magic bytes)")
        return PARQUET
    if named_gz and not compressed:
        raise Unsupported(f"the file is named .gz but is not gzip-compressed: rename it to {suffix}")
    if compressed and not named_gz:
        raise Unsupported(f"the file is gzip-compressed: rename it to {suffix}.gz")
    head = _peek(path)
    if _looks_utf16(head):
        raise Unsupported(f"the file looks UTF-16 encoded; quests must be UTF-8: convert it with "
                          f"iconv -f UTF-16 -t UTF-8 in{suffix} > out{suffix}")
    if container in (TXT, CSV, TSV) and b"\x00" in head:
        raise Unsupported("binary data (NUL bytes), not UTF-8 text")
    if container == JSON:
        stripped = head.lstrip()
        if stripped.startswith(b"["):
            return JSON
        if stripped.startswith(b"{"):
            first, newline, _ = stripped.partition(b"\n")
            if not newline and len(head) >= _HEAD_BYTES:
                return JSONL  # a first line longer than we peek: JSON Lines (validation judges each line)
            try:
                if isinstance(json.loads(first.strip()), dict):
                    return JSONL  # JSON Lines named .json (as the Hugging Face hub often has them)
            except ValueError:
                pass
            raise Unsupported("a JSON object, not an array of records: a .json quest is a JSON array "
                              "[{...}, {...}] (or JSON Lines); if the records are under a key, extract them, "
                              "e.g. jq '.data' in.json > out.json")
        if not stripped:
            raise Unsupported("empty file: no records")
        raise Unsupported("not JSON: a .json quest is a JSON array of records [{...}, {...}]")
    if container == TXT:
        for raw in head.split(b"\n"):
            if raw.strip():
                return TRANSCRIPT if _SPEAKER.match(raw.decode("utf-8", "replace").lstrip()) else TXT
    return container


# --------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------
@contextmanager
def _open_bytes(path: Path, hasher=None) -> Iterator[IO[bytes]]:
    """The decompressed content (gzip by magic bytes); ``hasher`` receives every raw byte, also those
    left unread when the caller stops early."""
    with open(path, "rb", buffering=0) as raw_file:
        source = raw_file if hasher is None else HashingReader(raw_file, hasher)
        buffered = io.BufferedReader(source, buffer_size=_CHUNK)  # type: ignore[arg-type]
        stream: IO[bytes] = gzip.GzipFile(fileobj=buffered, mode="rb") if buffered.peek(2)[:2] == GZIP_MAGIC \
            else buffered
        try:
            yield stream
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise CorruptFileError(f"broken gzip stream: {exc}") from None
        if hasher is not None:
            while buffered.read(_CHUNK):
                pass


def iter_items(path: Path, container: str, *, max_line_bytes: int | None = None, hasher=None) -> Iterator[Item]:
    """Stream the records of a quest file as :class:`Item` s, in file order, in memory bounded by one
    record (``max_line_bytes``; a JSON element or Parquet batch is read whole before its size is known).

    ``hasher`` (``hashlib``) receives every raw byte of the file. Raises :class:`CorruptFileError` when the
    file cannot be read on (broken gzip, invalid or truncated JSON, a CSV syntax error, a damaged Parquet
    file; the message names the record where it happened), ``OSError`` when it cannot be opened or read.
    """
    if container == JSONL:
        for number, text, error in open_text_lines(path, max_line_bytes=max_line_bytes, hasher=hasher):
            yield Item(number, text, error, len(text) if text is not None else 0)
    elif container == JSON:
        yield from _json_items(path, max_line_bytes, hasher)
    elif container in (CSV, TSV):
        yield from _csv_items(path, container, max_line_bytes, hasher)
    elif container == PARQUET:
        yield from _parquet_items(path, max_line_bytes, hasher)
    elif container in (TXT, TRANSCRIPT):
        yield from _text_items(path, container, max_line_bytes, hasher)
    else:
        raise ValueError(f"unknown container {container!r}; containers are {', '.join(CONTAINERS)}")


def parse_item(record: str | dict, mapping: dict[str, str], expected_format: str | None = None) -> tuple[str, dict]:
    """``(format, normalized example)`` of an :class:`Item` 's record: a JSON text through
    :func:`core.formats.parse_line`, a dict through :func:`core.formats.parse_record` (CSV cells JSON-decoded
    where the module doc says). Raises :class:`core.formats.RecordError`."""
    if isinstance(record, str):
        return parse_line(record, mapping, expected_format)
    return parse_record(record, mapping, expected_format, json_cells=isinstance(record, CsvRow))


def _approx_size(value, limit: int) -> int:
    """Bytes of a decoded JSON value, roughly (string lengths and 8 per other value); stops past ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, dict):
            total += 2
            for k, x in v.items():
                total += len(str(k)) + 4
                stack.append(x)
        elif isinstance(v, list):
            total += 2
            stack.extend(v)
        else:
            total += 8
    return total


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _json_items(path: Path, max_line_bytes: int | None, hasher) -> Iterator[Item]:
    import ijson

    limit = max_line_bytes if max_line_bytes is not None else sys.maxsize
    number = 0
    with _open_bytes(path, hasher) as stream:
        try:
            for element in ijson.items(stream, "item", use_float=True):
                number += 1
                size = _approx_size(element, limit)
                if size > limit:
                    yield Item(number, None, f"record is longer than max_line_bytes (about {size:,} > "
                               f"{limit:,} bytes)", size)
                    continue
                yield Item(number, element, None, size)
        except ijson.JSONError as exc:
            raise CorruptFileError(f"invalid or truncated JSON at record {number + 1:,} (after element "
                                   f"[{number - 1}] ended): {_first_line(exc)}") from None
        except UnicodeDecodeError as exc:
            raise CorruptFileError(f"not valid UTF-8 at record {number + 1:,}: {exc.reason}") from None


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" decodes a non-UTF-8 byte to


def _csv_items(path: Path, container: str, max_line_bytes: int | None, hasher) -> Iterator[Item]:
    limit = max_line_bytes if max_line_bytes is not None else sys.maxsize
    csv.field_size_limit(max(csv.field_size_limit(), min(limit + 1, sys.maxsize)))
    dialect = "excel-tab" if container == TSV else "excel"
    number = 0
    with _open_bytes(path, hasher) as stream:
        # bytes that are not UTF-8 become lone surrogates: the row that holds them is a bad record, not the file
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape",  # type: ignore[arg-type]
                                newline="")
        reader = csv.reader(text, dialect=dialect)
        try:
            header = next(reader, None)
            while header is not None and not any(h.strip() for h in header):
                header = next(reader, None)  # leading blank lines
            if header is None:
                return
            if any(_NOT_UTF8.search(h) for h in header):
                raise CorruptFileError("the header row is not valid UTF-8")
            names = [h.strip() for h in header]
            seen = [n for n in names if n]
            duplicates = sorted({n for n in seen if seen.count(n) > 1})
            if duplicates:
                raise CorruptFileError(f"the header row names column(s) {duplicates} more than once")
            for row in reader:
                number += 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                size = sum(len(c) for c in row)
                if any(_NOT_UTF8.search(c) for c in row):
                    yield Item(number, None, "row is not valid UTF-8", size)
                elif len(row) != len(names):
                    yield Item(number, None, f"row has {len(row)} fields, the header has {len(names)}", size)
                elif size > limit:
                    yield Item(number, None, f"row is longer than max_line_bytes ({size:,} > {limit:,} bytes)",
                               size)
                else:
                    yield Item(number, CsvRow((n, c) for n, c in zip(names, row, strict=True) if n), None, size)
        except csv.Error as exc:
            raise CorruptFileError(f"CSV syntax error at row {number:,}: {exc}") from None


def _parquet_items(path: Path, max_line_bytes: int | None, hasher) -> Iterator[Item]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise CorruptFileError("reading .parquet needs pyarrow: pip install 'pyarrow>=14'") from None
    if hasher is not None:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
    limit = max_line_bytes if max_line_bytes is not None else sys.maxsize
    number = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    number += 1
                    size = _approx_size(row, limit)
                    if size > limit:
                        yield Item(number, None, f"row is longer than max_line_bytes (about {size:,} > "
                                   f"{limit:,} bytes)", size)
                    else:
                        yield Item(number, row, None, size)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptFileError(f"damaged Parquet file at row {number + 1:,}: {_first_line(exc)}") from None


def _text_items(path: Path, container: str, max_line_bytes: int | None, hasher) -> Iterator[Item]:
    """Blank-line-separated blocks: ``{"text": block}`` (txt) or ``{"messages": ...}`` (transcript)."""
    limit = max_line_bytes if max_line_bytes is not None else sys.maxsize
    start, last, size, lines, error = 0, 0, 0, [], None

    def flush() -> Item:
        if error is not None:
            return Item(start, None, error, size)
        block = "\n".join(lines)
        if container == TXT:
            return Item(start, {"text": block}, None, size)
        try:
            return Item(start, {"messages": _transcript(lines)}, None, size)
        except RecordError as exc:
            return Item(start, None, str(exc), size)

    for number, text, problem in open_text_lines(path, max_line_bytes=max_line_bytes, hasher=hasher):
        if start and number != last + 1:  # a blank line ended the block
            yield flush()
            start, size, lines, error = 0, 0, [], None
        if not start:
            start = number
        last = number
        if error is not None:
            continue
        if problem is None and "\x00" in text:  # type: ignore[operator]
            problem = "holds NUL bytes: binary data, not text"
        if problem is not None:
            error, lines = f"line {number}: {problem}", []
            continue
        size += len(text) + 1  # type: ignore[arg-type]
        if size > limit:
            error, lines = f"paragraph is longer than max_line_bytes ({limit:,} bytes)", []
            continue
        lines.append(text)
    if start:
        yield flush()


def _transcript(lines: list[str]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    for i, line in enumerate(lines):
        m = _SPEAKER.match(line)
        if m:
            messages.append({"role": _SPEAKER_ROLES[m.group(1).lower()], "content": line[m.end():]})
        elif not messages:
            raise RecordError(f"text before the first speaker tag (Q:/A:, User:/Assistant:) in its line {i + 1}")
        else:
            messages[-1]["content"] += "\n" + line
    return messages
