"""Which records of a quest file train: validation's per-record verdict, stored once, read in one place.

Records are numbered by their container (:mod:`core.containers`: the physical line of a JSONL file, the
array position of a JSON element, the data row of a CSV/Parquet file, the first line of a text paragraph);
"line" below means that record number. Validation (:func:`core.validation.validate_file`) decides each line once -- bad, dropped by the length
policy, no trainable token left after truncation, or *kept* -- and records the kept lines in a
:class:`RecordVerdicts`. The admission thread stores it beside the quest's file as a sidecar
``<stored name>.records`` (moved with the file and its ``.report.json`` by
:meth:`core.quest_queue.QuestQueue.transition`). Everything that reads a quest's records for training
reads them through :func:`trainable_records`: the daemon feeding the engine (whose held-out split,
:func:`is_held_out`, indexes that stream), and ``python -m training eval`` (:func:`held_out_records`). No
one re-applies the length rule or re-tokenizes to decide.

**Sidecar format** (why a file, not a ledger table: one bit per line, written once, no row per record --
a 10-million-line file costs 1.25 MB before compression and a few KB after it, instead of ten million
SQLite rows; it lives and dies with the quest's file): one JSON header line (``content_hash``, ``format``,
``field_map``, ``max_line_bytes``, ``lines``, ``kept``, ``max_length``, ``length_policy``, ``container``:
absent in older sidecars, read as ``jsonl``), then the
zlib-compressed bitmap of kept physical line numbers (bit ``n - 1`` of byte ``(n - 1) // 8``, LSB first).

**What trains is what was validated**: :func:`trainable_records` parses only kept lines, with the field
map, format and line limit validation used, and stops after the last validated line (so lines appended
later are never trained); :func:`verify_unchanged` re-hashes the file before training (a mismatch raises
:class:`QuestChanged`: validate it again).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core import containers
from core.formats import CorruptFileError
from core.fsutil import atomic_write, sha256_file

RECORDS_SUFFIX = ".records"
_MAGIC = "realm-record-verdicts"
_VERSION = 1


class QuestChanged(RuntimeError):
    """The quest's file is not the one validation read (its SHA-256 differs): validate it again."""


class VerdictsError(ValueError):
    """A ``.records`` sidecar that is missing, unreadable or not ours."""


def is_held_out(index: int, holdout_every: int) -> bool:
    """Whether trainable record ``index`` (0-based, in the :func:`trainable_records` stream) is held out
    for evaluation: every ``holdout_every``-th one (``index % N == N - 1``), none when ``N <= 0``."""
    return holdout_every > 0 and index % holdout_every == holdout_every - 1


def count_train_examples(n_records: int, holdout_every: int) -> int:
    """Train examples among ``n_records`` trainable records (the held-out ones excluded)."""
    return n_records - (n_records // holdout_every if holdout_every > 0 else 0)


@dataclass
class RecordVerdicts:
    """The kept lines of one validated file (1-based physical line numbers), and how validation read it.

    ``lines``: the last physical line validation saw; ``kept``: how many lines are kept. Build with
    :meth:`keep` in increasing line order; persist with :meth:`save` / :func:`load_verdicts`.
    """

    content_hash: str = ""
    format: str | None = None
    field_map: dict[str, str] = field(default_factory=dict)
    max_line_bytes: int | None = None
    max_length: int | None = None
    length_policy: str | None = None
    container: str = containers.JSONL
    lines: int = 0
    kept: int = 0
    bits: bytearray = field(default_factory=bytearray)

    def keep(self, line: int) -> None:
        """Mark ``line`` (1-based) as trainable."""
        byte = (line - 1) >> 3
        if byte >= len(self.bits):
            self.bits.extend(bytes(byte + 1 - len(self.bits)))
        mask = 1 << ((line - 1) & 7)
        if not self.bits[byte] & mask:
            self.bits[byte] |= mask
            self.kept += 1

    def keeps(self, line: int) -> bool:
        byte = (line - 1) >> 3
        return 0 <= byte < len(self.bits) and bool(self.bits[byte] >> ((line - 1) & 7) & 1)

    def last_kept(self) -> int:
        """The last kept line number (0 when none)."""
        for byte in range(len(self.bits) - 1, -1, -1):
            if self.bits[byte]:
                return byte * 8 + self.bits[byte].bit_length()
        return 0

    def kept_lines(self) -> Iterator[int]:
        for byte, value in enumerate(self.bits):
            if value:
                for bit in range(8):
                    if value >> bit & 1:
                        yield byte * 8 + bit + 1

    def header(self) -> dict:
        return {"magic": _MAGIC, "version": _VERSION, "content_hash": self.content_hash, "format": self.format,
                "field_map": self.field_map, "max_line_bytes": self.max_line_bytes, "lines": self.lines,
                "kept": self.kept, "max_length": self.max_length, "length_policy": self.length_policy,
                "container": self.container}

    def save(self, path: Path) -> None:
        """Write the sidecar atomically (:func:`core.fsutil.atomic_write`). Raises ``OSError``."""
        with atomic_write(path, "wb") as f:
            f.write(json.dumps(self.header(), ensure_ascii=True).encode("ascii") + b"\n")
            f.write(zlib.compress(bytes(self.bits), 6))


def verdicts_path_for(data_path: Path) -> Path:
    """The sidecar beside a quest's data file: ``<name>.records``."""
    return data_path.with_name(data_path.name + RECORDS_SUFFIX)


def load_verdicts(path: Path) -> RecordVerdicts:
    """Read a ``.records`` sidecar. Raises :class:`VerdictsError` when it is missing or damaged."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise VerdictsError(f"cannot read {Path(path).name}: {exc.strerror or exc}") from None
    head, sep, body = raw.partition(b"\n")
    try:
        info = json.loads(head)
        if not sep or info.get("magic") != _MAGIC or info.get("version") != _VERSION:
            raise ValueError("not a record-verdicts file")
        bits = bytearray(zlib.decompress(body))
        verdicts = RecordVerdicts(content_hash=str(info["content_hash"]), format=info.get("format"),
                                  field_map=dict(info.get("field_map") or {}),
                                  max_line_bytes=info.get("max_line_bytes"), max_length=info.get("max_length"),
                                  length_policy=info.get("length_policy"), lines=int(info["lines"]),
                                  container=str(info.get("container") or containers.JSONL),
                                  kept=int(info["kept"]), bits=bits)
    except (ValueError, KeyError, TypeError, zlib.error) as exc:
        raise VerdictsError(f"{Path(path).name} is damaged: {exc}") from None
    if verdicts.container not in containers.CONTAINERS:
        raise VerdictsError(f"{Path(path).name} names an unknown container {verdicts.container!r}")
    if sum(bin(b).count("1") for b in bits) != verdicts.kept:
        raise VerdictsError(f"{Path(path).name} is damaged: its bitmap does not hold {verdicts.kept} lines")
    return verdicts


def verify_unchanged(data_path: Path, verdicts: RecordVerdicts) -> None:
    """Raise :class:`QuestChanged` unless ``data_path`` still has the SHA-256 validation recorded (and
    ``OSError`` when it cannot be read). Reads the whole file (about 1 s per GB)."""
    digest = sha256_file(data_path)
    if digest != verdicts.content_hash:
        raise QuestChanged(f"{data_path.name} changed after it was validated (SHA-256 {digest[:12]}..., "
                           f"validated {verdicts.content_hash[:12]}...)")


def trainable_records(data_path: Path, verdicts: RecordVerdicts) -> Iterator[tuple[int, dict]]:
    """Yield ``(record number, normalized example)`` for every record validation kept, in file order: the
    one stream training reads (and the held-out split indexes), through the container validation detected
    (:func:`core.containers.iter_items`). Records after the last validated one are never read. Raises
    :class:`QuestChanged` when a kept record no longer parses or the file no longer reads (it changed:
    :func:`verify_unchanged` first), ``OSError`` when the file cannot be read."""
    last = min(verdicts.last_kept(), verdicts.lines)
    if last == 0:
        return
    unit = containers.RECORD_UNIT[verdicts.container]
    items = containers.iter_items(data_path, verdicts.container, max_line_bytes=verdicts.max_line_bytes)
    number = 0
    try:
        for number, record, error, _ in items:
            if number > last:
                return
            if not verdicts.keeps(number):
                continue
            try:
                if error is not None:
                    raise ValueError(error)
                _, example = containers.parse_item(record, verdicts.field_map, verdicts.format)  # type: ignore[arg-type]
            except ValueError as exc:
                raise QuestChanged(f"{data_path.name} {unit} {number} was valid when validated, now: {exc}") \
                    from None
            yield number, example
    except CorruptFileError as exc:
        raise QuestChanged(f"{data_path.name} no longer reads after {unit} {number}: {exc}") from None
    finally:
        items.close()


def held_out_records(data_path: Path, verdicts: RecordVerdicts, every: int,
                     limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """The records training held out (:func:`is_held_out` over :func:`trainable_records`), at most
    ``limit`` of them -- the engine's eval set when ``limit`` is ``training.eval_max_examples``.
    ``every`` = 1 yields every trainable record."""
    taken = 0
    for index, record in enumerate(trainable_records(data_path, verdicts)):
        if limit is not None and taken >= limit:
            return
        if is_held_out(index, every):
            taken += 1
            yield record
