"""Streaming validation of a quest file, in constant memory, into a :class:`ValidationReport`.

:func:`validate_file` reads the file once, through its container (:mod:`core.containers`: JSON Lines, a JSON
array, CSV/TSV, Parquet, plain text, transcripts; gzip where usual), checks every record with the same rules
the trainer uses (:func:`core.containers.parse_item`, :func:`core.records.trainable_records`),
measures token lengths with a caller-supplied ``count_tokens`` or ``count_tokens_batch`` (the hero's
tokenizer, batched in groups of :data:`TOKEN_BATCH_EXAMPLES`) against ``training.max_length`` under
``validation.length_policy`` -- and, after truncation (:mod:`core.chat`: the prompt side is cut first),
whether any token is left to learn from: an example with none is dropped (``length_policy`` truncate or
drop) or a bad line (reject) -- and decides whether the file is accepted:

- rejected: a file no container reads (:func:`core.containers.detect`: unknown suffix, gzip name/content
  mismatch, UTF-16, binary text, a JSON object instead of an array; a JSON array named .jsonl gets a hint),
  a file that cannot be read to its end (broken gzip, truncated JSON, a CSV syntax error, damaged Parquet:
  the reason names the record), an empty file, no valid record, or a bad-record ratio above
  ``validation.max_bad_line_ratio``;
- accepted otherwise: bad lines are skipped and listed, dropped lines (``length_policy: drop``) listed.

The report names the ``container`` and the ``format``; its numbers (``bad_lines[].line``...) are record
numbers of the container (``record_numbers`` says which: the line of a JSONL file, the array position of
a JSON element, the data row of a CSV...).

Memory stays flat: records are streamed (each at most ``validation.max_line_bytes``), token lengths are kept
as a ``Counter`` of lengths (exact percentiles), and at most :data:`MAX_LISTED_LINES` bad/dropped lines are
stored (the rest only counted in ``bad_lines_truncated`` / ``dropped_lines_truncated``).

Each line's verdict is decided here once: the kept lines (``examples`` of them) are recorded in
the caller's :class:`core.records.RecordVerdicts` (``validate_file(..., verdicts=)``), which the daemon stores beside the quest and
everything that trains or evaluates reads through :func:`core.records.trainable_records`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from core import containers
from core.config import QuestRule, RealmConfig
from core.formats import (
    PREFERENCE_FORMATS,
    PROMPT_ONLY,
    SFT_FORMATS,
    UNPAIRED_FORMATS,
    CorruptFileError,
    RecordError,
    field_map_for,
    preference_as_sft,
    prompt_as_sft,
)
from core.fsutil import sha256_file, write_text_atomic
from core.records import RecordVerdicts
from core.schools import SCHOOL_DATA, school_for, school_problem

#: At most this many bad lines (and, separately, dropped lines) are stored in a report.
MAX_LISTED_LINES = 10_000
ACCEPTED_SUFFIXES = containers.ACCEPTED_SUFFIXES
#: Bad lines quoted in a rejection reason.
REASON_EXAMPLES = 3
#: Formats measured as their SFT-shaped sides (:func:`core.formats.preference_as_sft`).
_SIDED_FORMATS = PREFERENCE_FORMATS | UNPAIRED_FORMATS


def _sides(example: dict, fmt: str) -> tuple[dict, ...]:
    """The SFT-shaped examples measured for one normalized example of format ``fmt``."""
    if fmt in _SIDED_FORMATS:
        return preference_as_sft(example)
    return (prompt_as_sft(example),) if fmt == PROMPT_ONLY else (example,)

#: Examples (and bytes of their JSON lines) measured per ``count_tokens_batch`` call.
TOKEN_BATCH_EXAMPLES = 256
TOKEN_BATCH_BYTES = 16 * 1024 * 1024

CountTokens = Callable[[dict], "tuple[int, ...]"]
CountTokensBatch = Callable[[list], "list[tuple[int, ...]]"]
"""A counter returns ``(tokens, trainable)`` as written, or ``(tokens, trainable, kept_tokens,
kept_trainable)`` with the figures after truncation to ``max_length`` too (:class:`core.chat.TokenCount`,
from :func:`core.chat.measure_batch`); from a 2-tuple the kept figures are derived as truncation keeps
them for ``text`` and ``prompt``/``completion`` (:func:`kept_figures`)."""


class LineIssue(BaseModel):
    """One bad or dropped record: its number (``line``: the physical line of a JSONL file, else the record
    number of its container, see ``ValidationReport.record_numbers``) and the human reason."""

    line: int
    reason: str


class TokenStats(BaseModel):
    """Token counts of the kept records. ``total`` and ``trainable``: what training gets, after truncation
    (``cut`` and ``trainable_cut``: what truncation removes). ``min``..``max``: record lengths as written,
    before truncation (to choose ``max_length``); percentiles are nearest-rank, exact."""

    total: int
    trainable: int
    cut: int = 0
    trainable_cut: int = 0
    min: int
    p50: int
    p95: int
    p99: int
    max: int


class ValidationReport(BaseModel):
    """What :func:`validate_file` found. ``to_dict()`` / ``to_json()`` give the JSON report.

    Counts: ``lines`` (non-blank) = ``records_valid`` + ``records_bad``; ``records_dropped`` of the valid
    records are too long (``length_policy: drop``) or have no token left to learn from, and ``examples`` =
    ``records_valid - records_dropped`` will be trained (``truncated`` of them cut to ``max_length``).
    ``records_untrainable``: records with no trainable token after truncation (dropped, or bad lines under
    ``length_policy: reject``).
    """

    file: str
    format: str | None = None
    container: str | None = None
    record_numbers: str | None = None
    accepted: bool = False
    reason: str | None = None
    size_bytes: int = 0
    content_hash: str = ""
    lines: int = 0
    records_valid: int = 0
    records_bad: int = 0
    records_dropped: int = 0
    records_untrainable: int = 0
    examples: int = 0
    bad_line_ratio: float = 0.0
    max_bad_line_ratio: float = 0.0
    bad_lines: list[LineIssue] = []
    bad_lines_truncated: int = 0
    dropped_lines: list[LineIssue] = []
    dropped_lines_truncated: int = 0
    truncated: int = 0
    tokens: TokenStats | None = None
    trainable_token_ratio: float | None = None
    max_length: int = 0
    length_policy: str = "truncate"
    trainable: bool = False
    school: str | None = None
    field_map: dict[str, str] = {}
    note: str | None = None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def length_action(tokens: int, max_length: int, length_policy: str) -> str:
    """What to do with an example of ``tokens`` tokens: ``"keep"``, or (when ``tokens > max_length``)
    the ``length_policy`` itself: ``"truncate"``, ``"drop"`` or ``"reject"``. The trainer uses this too,
    so validation and training agree on which records are trained."""
    return "keep" if tokens <= max_length else length_policy


def kept_figures(count, max_length: int) -> tuple[int, int, int, int]:
    """``(tokens, trainable, kept_tokens, kept_trainable)`` from a counter's result (see
    :data:`CountTokensBatch`); a 2-tuple's kept figures follow :mod:`core.chat`'s truncation of ``text``
    and ``prompt``/``completion`` (learned tokens are at the end and kept, at most ``max_length - 1``)."""
    if len(count) >= 4:
        return int(count[0]), int(count[1]), int(count[2]), int(count[3])
    tokens, trainable = int(count[0]), int(count[1])
    if tokens <= max_length:
        return tokens, trainable, tokens, trainable
    return tokens, trainable, max_length, min(trainable, max_length - 1)


def measure_example(example: dict, fmt: str, count_tokens: CountTokens) -> tuple[int, int]:
    """``(tokens, trainable_tokens)`` of a normalized example. SFT examples go to ``count_tokens`` as they
    are; a preference example is measured as its longer side (prompt + chosen, or prompt + rejected, as
    SFT-shaped examples, see :func:`core.formats.preference_as_sft`). Raises whatever ``count_tokens``
    raises."""
    if fmt in _SIDED_FORMATS or fmt == PROMPT_ONLY:
        tokens, trainable = max(count_tokens(side) for side in _sides(example, fmt))
    else:
        tokens, trainable = count_tokens(example)
    return int(tokens), int(trainable)


def _batched(count_tokens: CountTokens) -> CountTokensBatch:
    def count_each(examples: list[dict]) -> list[tuple[int, int] | Exception]:
        out: list[tuple[int, int] | Exception] = []
        for example in examples:
            try:
                out.append(count_tokens(example))
            except Exception as exc:  # the caller's tokenizer: any failure is that line's problem
                out.append(exc)
        return out
    return count_each  # type: ignore[return-value]


class _Measurer:
    """Buffers lines (at most :data:`TOKEN_BATCH_EXAMPLES` examples / :data:`TOKEN_BATCH_BYTES` of JSON),
    measures their examples in one ``count_tokens_batch`` call, then applies the length policy and records
    every buffered line in file order."""

    def __init__(self, tally: _Tally, count_batch: CountTokensBatch, max_length: int, policy: str):
        self.tally, self.count_batch, self.max_length, self.policy = tally, count_batch, max_length, policy
        self.pending: list[tuple[int, dict | None, str]] = []  # (line, example, fmt) or (line, None, reason)
        self.examples = self.bytes = 0

    def add_bad(self, line: int, reason: str) -> None:
        if self.pending:
            self.pending.append((line, None, reason))
        else:
            self.tally.add_bad(line, reason)

    def add(self, line: int, example: dict, fmt: str, size: int) -> None:
        self.pending.append((line, example, fmt))
        self.examples += 1
        self.bytes += size
        if self.examples >= TOKEN_BATCH_EXAMPLES or self.bytes >= TOKEN_BATCH_BYTES:
            self.flush()

    def _count(self, parts: list[dict]) -> list:
        try:
            counts = list(self.count_batch(parts))
            if len(counts) != len(parts):
                raise ValueError(f"count_tokens_batch returned {len(counts)} results for {len(parts)} examples")
            return counts
        except Exception:
            if len(parts) == 1:
                raise
        out = []
        for part in parts:  # isolate the failing example(s)
            try:
                out.append(self._count([part])[0])
            except Exception as exc:
                out.append(exc)
        return out

    def flush(self) -> None:
        parts: list[dict] = []
        owners: list[int] = []
        for k, (_, example, fmt) in enumerate(self.pending):
            if example is not None:
                sides = _sides(example, fmt)
                parts.extend(sides)
                owners.extend([k] * len(sides))
        try:
            counts = self._count(parts) if parts else []
        except Exception as exc:
            counts = [exc]
        measured: dict[int, tuple[int, int] | Exception] = {}
        for owner, count in zip(owners, counts, strict=True):
            if not isinstance(count, Exception):
                try:
                    count = kept_figures(count, self.max_length)
                except Exception as exc:
                    count = exc
            previous = measured.get(owner)
            if previous is None or isinstance(count, Exception) or (
                    not isinstance(previous, Exception) and count > previous):
                measured[owner] = count  # a preference example: its longer side, or the failure
        tally, max_length = self.tally, self.max_length
        for k, (line, example, fmt_or_reason) in enumerate(self.pending):
            if example is None:
                tally.add_bad(line, fmt_or_reason)
                continue
            result = measured[k]
            if isinstance(result, Exception):
                tally.add_bad(line, f"could not tokenize: {type(result).__name__}: {result}"[:500])
                continue
            tokens, trainable, kept_tokens, kept_trainable = result
            action = length_action(tokens, max_length, self.policy)
            if action == "reject":
                tally.add_bad(line, f"{tokens} tokens > max_length {max_length} (length_policy reject)")
                continue
            if action != "drop" and kept_trainable <= 0 and fmt_or_reason in SFT_FORMATS:
                why = (f"no trainable token left after truncation to max_length {max_length} ({tokens} tokens, "
                       f"{trainable} trainable)" if action == "truncate" else
                       f"no trainable token ({tokens} tokens): nothing to learn from")
                tally.untrainable += 1
                if self.policy == "reject":
                    tally.add_bad(line, f"{why} (length_policy reject)")
                    continue
                tally.valid += 1
                tally.add_dropped(line, why)
                continue
            tally.valid += 1
            if action == "drop":
                tally.length_dropped += 1
                tally.add_dropped(line, f"{tokens} tokens > max_length {max_length}")
                continue
            if action == "truncate":
                tally.truncated += 1
            tally.keep(line)
            tally.lengths[tokens] += 1
            tally.tokens_total += kept_tokens
            tally.tokens_trainable += kept_trainable
            tally.tokens_cut += tokens - kept_tokens
            tally.trainable_cut += trainable - kept_trainable
        self.pending.clear()
        self.examples = self.bytes = 0


class _Tally:
    """Counts, capped lists and the token-length histogram of one validation run."""

    def __init__(self):
        self.lines = self.valid = self.bad = self.dropped = self.truncated = 0
        self.untrainable = self.length_dropped = 0
        self.last_line = 0  # the last physical line number read
        self.bad_lines: list[tuple[int, str]] = []
        self.dropped_lines: list[tuple[int, str]] = []
        self.lengths: Counter[int] = Counter()
        self.tokens_total = self.tokens_trainable = self.tokens_cut = self.trainable_cut = 0
        self.verdicts = RecordVerdicts()  # replaced by the caller's, if any

    def keep(self, line: int) -> None:
        """``line`` trains (see :mod:`core.records`)."""
        self.verdicts.keep(line)

    def add_bad(self, line: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_lines) < MAX_LISTED_LINES:
            self.bad_lines.append((line, reason))

    def add_dropped(self, line: int, reason: str) -> None:
        self.dropped += 1
        if len(self.dropped_lines) < MAX_LISTED_LINES:
            self.dropped_lines.append((line, reason))

    def token_stats(self) -> TokenStats | None:
        n = sum(self.lengths.values())
        if n == 0:
            return None
        keys = sorted(self.lengths)
        wanted = {p: max(1, math.ceil(p / 100 * n)) for p in (50, 95, 99)}
        found: dict[int, int] = {}
        cumulative = 0
        for k in keys:
            cumulative += self.lengths[k]
            for p, rank in wanted.items():
                if p not in found and cumulative >= rank:
                    found[p] = k
        return TokenStats(total=self.tokens_total, trainable=self.tokens_trainable, cut=self.tokens_cut,
                          trainable_cut=self.trainable_cut, min=keys[0],
                          p50=found[50], p95=found[95], p99=found[99], max=keys[-1])


def _array_hint(name: str) -> str:
    suffix, gz = containers.split_suffix(name)
    stem = name[: -len(suffix + (".gz" if gz else ""))] if suffix else name
    return (f"the file is a JSON array, not JSON Lines (one object per line): name it "
            f"'{stem}.json{'.gz' if gz else ''}' to read it as an array")


def _file_level(path: Path, name: str) -> tuple[str | None, str | None, bool]:
    """``(container, None, starts with '[')``, or ``(None, why the file as a whole is unusable, False)``
    (type, compression, encoding, see :func:`core.containers.detect`)."""
    try:
        container = containers.detect(path, name)
    except containers.Unsupported as exc:
        return None, str(exc), False
    except CorruptFileError as exc:
        return None, str(exc), False
    looks_like_array = False
    if container == containers.JSONL:
        try:
            looks_like_array = containers._peek(path, 4096).lstrip().startswith(b"[")
        except CorruptFileError as exc:
            return None, str(exc), False
    return container, None, looks_like_array


def _first_bad(tally: _Tally, unit: str = "line") -> str:
    shown = "; ".join(f"{unit} {n}: {r}" for n, r in tally.bad_lines[:REASON_EXAMPLES])
    more = tally.bad - min(tally.bad, REASON_EXAMPLES)
    return shown + (f"; ... and {more:,} more" if more else "")


def validate_file(path: Path, *, display_name: str | None = None, config: RealmConfig,
                  count_tokens: CountTokens | None = None,
                  count_tokens_batch: CountTokensBatch | None = None,
                  verdicts: RecordVerdicts | None = None, school: str | None = None,
                  school_check: Callable[[str, QuestRule], str | None] | None = None) -> ValidationReport:
    """Validate the quest file at ``path`` and return its report (never raises for bad content).

    ``display_name``: the user's file name (default ``path.name``); it decides the accepted suffix and the
    ``validation.field_map`` globs. ``count_tokens(example) -> (tokens, trainable_tokens)`` measures one
    normalized SFT-shaped example (``text``, ``prompt``/``completion`` or ``messages``) with the hero's
    tokenizer (chat template included); ``count_tokens_batch(examples) -> [(tokens, trainable), ...]``
    does the same for a list (up to :data:`TOKEN_BATCH_EXAMPLES`; faster with a fast tokenizer's batch
    encoding) and wins when both are given. Neither: no token statistics, no length policy. An exception
    from the counter makes that line bad (a failing batch is retried one example at a time).

    ``school``: the quest's school when something other than its ``schools`` rule chose it (a campaign
    stage's, :mod:`core.campaigns`); a file whose school trains prompts (``grpo``) is read as
    ``prompt_only`` records (:func:`core.formats.parse_record`).

    ``verdicts``: an empty :class:`core.records.RecordVerdicts`, filled with the lines that train (the
    ``examples`` kept records) and how the file was read; left empty for a file rejected as a whole before
    its lines are read (type, compression, encoding).

    ``school_check(school, rule) -> reason | None``: what the quest's school cannot do with its settings
    beyond the format (e.g. Whisper's teacher, :func:`core.schools.teacher.school_check`); a reason
    rejects the file.

    Raises ``OSError`` only when the file itself cannot be opened, stat'ed or read (missing, permissions,
    I/O error); every problem with its content is reported in the returned :class:`ValidationReport`.
    """
    path = Path(path)
    name = display_name or path.name
    vcfg, max_length = config.validation, config.training.max_length
    report = ValidationReport(file=name, size_bytes=path.stat().st_size, max_length=max_length,
                              length_policy=vcfg.length_policy, max_bad_line_ratio=vcfg.max_bad_line_ratio)
    container, reason, looks_like_array = _file_level(path, name)
    if reason is not None:
        report.content_hash = sha256_file(path)
        report.reason = reason
        return report
    report.container, report.record_numbers = container, containers.NUMBERING[container]

    mapping = field_map_for(name, vcfg.field_map)
    report.field_map = mapping
    tally = _Tally()
    if verdicts is not None:
        tally.verdicts = verdicts
    hasher = hashlib.sha256()
    chosen = school or school_for(name, None, config)[0]
    fmt: str | None = PROMPT_ONLY if SCHOOL_DATA.get(chosen) == "prompts" else None
    if count_tokens_batch is None and count_tokens is not None:
        count_tokens_batch = _batched(count_tokens)
    measurer = None if count_tokens_batch is None else _Measurer(tally, count_tokens_batch, max_length,
                                                                 vcfg.length_policy)
    try:
        for number, record, error, size in containers.iter_items(path, container,  # type: ignore[arg-type]
                                                                 max_line_bytes=vcfg.max_line_bytes,
                                                                 hasher=hasher):
            tally.lines += 1
            tally.last_line = number
            if error is not None:
                tally.add_bad(number, error) if measurer is None else measurer.add_bad(number, error)
                continue
            try:
                line_fmt, example = containers.parse_item(record, mapping, fmt)  # type: ignore[arg-type]
            except RecordError as exc:
                tally.add_bad(number, str(exc)) if measurer is None else measurer.add_bad(number, str(exc))
                continue
            fmt = line_fmt  # the first valid record fixes the file's format (as in iter_valid_records)
            if measurer is None:
                tally.valid += 1
                tally.keep(number)
            else:
                measurer.add(number, example, fmt, size)
        if measurer is not None:
            measurer.flush()
        content_hash = hasher.hexdigest()
        stream_error = None
    except CorruptFileError as exc:
        if measurer is not None:
            measurer.flush()
        content_hash = sha256_file(path)
        stream_error = (f"{exc} (after line {tally.lines:,})" if container == containers.JSONL
                        else f"{exc} ({tally.lines:,} records read before it)")

    report.content_hash = content_hash
    report.format = fmt
    report.lines, report.records_valid = tally.lines, tally.valid
    report.records_bad, report.records_dropped, report.truncated = tally.bad, tally.dropped, tally.truncated
    report.records_untrainable = tally.untrainable
    if verdicts is not None:
        verdicts.content_hash, verdicts.format, verdicts.field_map = content_hash, fmt, dict(mapping)
        verdicts.container = container
        verdicts.max_line_bytes, verdicts.lines = vcfg.max_line_bytes, tally.last_line
        verdicts.max_length, verdicts.length_policy = max_length, vcfg.length_policy
    report.examples = tally.valid - tally.dropped
    report.bad_line_ratio = tally.bad / tally.lines if tally.lines else 0.0
    report.bad_lines = [LineIssue(line=n, reason=r) for n, r in tally.bad_lines]
    report.bad_lines_truncated = tally.bad - len(tally.bad_lines)
    report.dropped_lines = [LineIssue(line=n, reason=r) for n, r in tally.dropped_lines]
    report.dropped_lines_truncated = tally.dropped - len(tally.dropped_lines)
    report.tokens = tally.token_stats()
    if report.tokens is not None and report.tokens.total:
        report.trainable_token_ratio = report.tokens.trainable / report.tokens.total
    report.school, rule = school_for(name, fmt, config)
    report.school = school or report.school  # a campaign stage's school wins; the matching rule gives settings
    school_reason = school_problem(report.school, fmt, rule)
    if school_reason is None and fmt is not None and school_check is not None:
        school_reason = school_check(report.school, rule)
    report.trainable = fmt is not None and school_reason is None

    notes = []
    min_ratio = config.training.min_trainable_token_ratio
    if report.trainable and fmt in SFT_FORMATS and report.trainable_token_ratio is not None \
            and report.trainable_token_ratio < min_ratio:
        notes.append(f"only {report.trainable_token_ratio:.2%} of tokens are trainable (below "
                     f"training.min_trainable_token_ratio {min_ratio:.2%}): check that completions or "
                     "assistant messages hold the answers")
    report.note = "; ".join(notes) or None
    report.reason = _rejection_reason(tally, report, stream_error, container)  # type: ignore[arg-type]
    if report.reason is None and school_reason is not None:
        report.reason = school_reason
    if report.reason is not None and looks_like_array:  # a JSON array named .jsonl: say how to read it
        report.reason = f"{_array_hint(name)} ({report.reason})"
    report.accepted = report.reason is None
    return report


def _rejection_reason(tally: _Tally, report: ValidationReport, stream_error: str | None,
                      container: str = containers.JSONL) -> str | None:
    jsonl, unit = container == containers.JSONL, containers.RECORD_UNIT[container]
    bad = "bad lines" if jsonl else "bad records"
    if stream_error is not None:
        return stream_error
    if tally.lines == 0:
        return "empty file: no non-blank lines" if jsonl else "empty file: no records"
    if tally.valid == tally.dropped:
        if tally.valid and not tally.untrainable:
            return (f"every valid record is longer than max_length {report.max_length} tokens and length_policy "
                    "is drop: nothing left to train")
        if tally.valid:
            long = (f"{tally.length_dropped:,} longer than max_length {report.max_length} tokens "
                    "(length_policy drop), " if tally.length_dropped else "")
            return (f"no valid record has a token left to learn from: {long}{tally.untrainable:,} with no "
                    "trainable token (after truncation): nothing left to train")
        if tally.untrainable:
            return (f"no valid records ({tally.bad:,} {bad}, {tally.untrainable:,} of them with no trainable "
                    f"token): {_first_bad(tally, unit)}")
        return f"no valid records ({tally.bad:,} {bad}): {_first_bad(tally, unit)}"
    if report.bad_line_ratio > report.max_bad_line_ratio:
        return (f"{tally.bad:,} of {tally.lines:,} {'lines' if jsonl else 'records'} are bad "
                f"({report.bad_line_ratio:.2%} > validation.max_bad_line_ratio {report.max_bad_line_ratio:.2%}): "
                f"{_first_bad(tally, unit)}")
    return None


def write_report(report: ValidationReport, path: Path) -> None:
    """Write ``report`` as JSON to ``path`` atomically (a hidden temporary file in the same folder, fsync,
    rename). Raises ``OSError`` when the folder is not writable."""
    write_text_atomic(path, report.to_json() + "\n")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return ""


def format_report_text(report: ValidationReport, max_listed: int = 20) -> str:
    """A human summary of ``report`` for the CLI, listing at most ``max_listed`` bad and dropped lines."""
    verdict = "ACCEPTED" if report.accepted else "REJECTED"
    kind = ""
    if report.accepted:
        kind = f", school {report.school}" if report.trainable else ""
    container = f"container {report.container}" if report.container else ""
    what = ", ".join(x for x in (f"format {report.format}{kind}" if report.format else "", container) if x)
    head = f"{report.file}: {verdict}" + (f" ({what})" if what else "")
    unit = containers.RECORD_UNIT.get(report.container or containers.JSONL, "line")
    noun = "lines" if report.container in (None, containers.JSONL) else "records"
    out = [head]
    if report.reason:
        out.append(f"  reason: {report.reason}")
    out.append(f"  size {_size(report.size_bytes)}, sha256 {report.content_hash}")
    if report.field_map:
        out.append("  field_map: " + ", ".join(f"{k} -> {v}" for k, v in report.field_map.items()))
    if report.reason is None or report.lines:
        if report.record_numbers and report.container != containers.JSONL:
            out.append(f"  {report.record_numbers}")
        out.append(f"  {noun} {report.lines:,}: valid {report.records_valid:,}, bad {report.records_bad:,} "
                   f"({report.bad_line_ratio:.2%}; max {report.max_bad_line_ratio:.2%}), dropped "
                   f"{report.records_dropped:,}, truncated {report.truncated:,}, examples {report.examples:,} "
                   f"(max_length {report.max_length}, length_policy {report.length_policy})")
        if report.records_untrainable:
            out.append(f"  {report.records_untrainable:,} records with no trainable token (after truncation): "
                       + ("bad lines" if report.length_policy == "reject" else "dropped"))
    if report.tokens is not None:
        t = report.tokens
        ratio = f", trainable {report.trainable_token_ratio:.1%}" if report.trainable_token_ratio is not None else ""
        cut = f" (truncation cuts {t.cut:,}, {t.trainable_cut:,} of them trainable)" if t.cut else ""
        out.append(f"  tokens trained {t.total:,}{ratio}{cut}; per record as written: min {t.min} / p50 {t.p50} / "
                   f"p95 {t.p95} / p99 {t.p99} / max {t.max}")
    for title, issues, hidden in ((f"bad {noun}", report.bad_lines, report.bad_lines_truncated),
                                  (f"dropped {noun}", report.dropped_lines, report.dropped_lines_truncated)):
        if not issues:
            continue
        total = len(issues) + hidden
        out.append(f"  {title} ({total:,}):")
        out += [f"    {unit} {i.line}: {i.reason}" for i in issues[:max_listed]]
        if total > max_listed:
            out.append(f"    ... and {total - max_listed:,} more (see the JSON report)")
    if report.note:
        out.append(f"  note: {report.note}")
    return "\n".join(out)
