"""Admission: from ``inbox/`` into the queue -- taking, validating, duplicate detection -- on its own thread.

:class:`Admission` is a stoppable thread (watchdog's :class:`watchdog.utils.BaseThread`, as watchdog's own
observers are: ``start()``, ``stop()``, ``join()``). It waits for inbox changes
(:class:`core.ingest.InboxWatcher`), takes settled files (:meth:`core.quest_queue.QuestQueue.admit`),
validates each with its own copy of the hero's tokenizer (:func:`core.validation.validate_file`), stores
the report and the per-record verdict beside the file (:mod:`core.records`) and moves it to
``queue/<priority>/``, ``queue/failed/`` or, as a duplicate, ``queue/recently_completed/``.

**One file's problem costs that file only.** Whatever an entry of the inbox does -- a name that is not
UTF-8 (stored and shown escaped, :func:`core.quest_queue.printable_name`), a directory, FIFO or socket
(rejected with a report, never opened), a file the daemon may not move (retried with a back-off from
:data:`RETRY_FIRST_SECONDS` doubling to :data:`RETRY_MAX_SECONDS`, and at once when the file changes),
or any exception while validating it (rejected with the exception as its reason) -- the thread goes on.
Only a failure of the thread itself (e.g. the ledger is gone) ends it; :attr:`Admission.error` holds it
for the daemon to raise.

The daemon asks for a quest to be validated again with :meth:`Admission.request_validation` (its file
changed after validation, or its verdict is missing).
"""

from __future__ import annotations

import copy
import logging
import queue as queue_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.utils import BaseThread

from core.campaigns import stage_school_of
from core.chat import measure_batch
from core.config import RealmConfig, quest_rule_for
from core.ingest import InboxScanner, InboxWatcher, entry_kind, priority_for
from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue, printable_name
from core.realm import Realm
from core.records import RecordVerdicts, count_train_examples
from core.schools.teacher import school_check
from core.validation import ValidationReport, validate_file, write_report

log = logging.getLogger("realm.admission")

RETRY_FIRST_SECONDS = 1.0
"""A file that could not be taken is tried again after this long, then after twice as long each time..."""
RETRY_MAX_SECONDS = 300.0
"""... up to this interval (and at once whenever the file changes)."""


@dataclass
class _Retry:
    signature: tuple[int, int]  # (size, mtime_ns) when it failed
    attempts: int
    next_at: float


class Admission(BaseThread):
    """The admission thread of one realm (see the module doc).

    ``tokenizer``: the hero's (copied: fast tokenizers are not safe to share between threads).
    ``ledger`` and ``queue`` may be shared with the daemon (both are thread-safe).
    """

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger, queue: QuestQueue, tokenizer: Any,
                 *, clock=time.monotonic):
        super().__init__()
        self.name = "admission"
        self.realm, self.config, self.ledger, self.queue = realm, config, ledger, queue
        self.tokenizer = copy.deepcopy(tokenizer)
        self.clock = clock
        self.error: BaseException | None = None
        self.watcher = InboxWatcher(realm, config.ingest)
        self.scanner = InboxScanner(realm, config.ingest, closed_at=self.watcher.closed_at)
        self._requests: queue_module.SimpleQueue[int] = queue_module.SimpleQueue()
        self._untakeable: dict[Path, _Retry] = {}
        self._stuck: set[int] = set()  # quests left in validating: even failing them raised
        self._busy = False

    # lifecycle (watchdog.utils.BaseThread) -----------------------------------------------------------
    def on_thread_start(self) -> None:
        self.watcher.start()

    def on_thread_stop(self) -> None:
        self.watcher.wake.set()

    def run(self) -> None:
        try:
            for quest in self.ledger.list_quests([QuestState.VALIDATING], limit=10**9):  # interrupted ones
                if not self.should_keep_running():
                    break
                self.validate(quest["id"])
            while self.should_keep_running():
                self._busy = True
                self._serve_requests()
                for path, priority in self.scanner.scan(defer=self._waiting_to_retry):
                    if not self.should_keep_running():
                        break
                    self.take(path, priority)
                for path in self.scanner.strays():
                    if not self.should_keep_running():
                        break
                    self.take(path, None)
                self._busy = False
                pending = self.scanner.pending()
                timeout = (self.config.ingest.settle_seconds / 2 if pending
                           else self.config.ingest.poll_interval_seconds)
                if self._untakeable:
                    timeout = min(timeout, max(0.0, min(r.next_at for r in self._untakeable.values()) - self.clock()))
                self.watcher.wait(max(0.05, timeout))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the daemon's main loop
            log.exception("admission thread failed")
            self.error = exc
        finally:
            self._busy = False
            self.watcher.stop()

    def request_validation(self, quest_id: int) -> None:
        """Validate quest ``quest_id`` (already moved to ``validating``) on this thread, soon."""
        self._requests.put(quest_id)
        self.watcher.wake.set()

    def idle(self) -> bool:
        """True when the inbox is empty, nothing waits to be validated and the thread is not at work."""
        return (not self._busy and self._requests.empty() and self.scanner.pending() == 0
                and all(q["id"] in self._stuck for q in self.ledger.list_quests([QuestState.VALIDATING])))

    def _serve_requests(self) -> None:
        while self.should_keep_running():
            try:
                quest_id = self._requests.get_nowait()
            except queue_module.Empty:
                return
            quest = self.ledger.get_quest(quest_id)
            if quest is not None and quest["state"] == QuestState.VALIDATING.value:
                self.validate(quest_id)

    # taking ---------------------------------------------------------------------------------------
    def take(self, path: Path, priority: str | None) -> int | None:
        """Move ``path`` from the inbox into ``queue/validating/`` as a new quest and validate it; returns
        the quest id, or None when it is gone or cannot be moved now (then retried with a back-off).
        ``priority``: None to derive it from the path (:func:`core.ingest.priority_for`)."""
        shown = printable_name(path.name)
        try:
            st = path.lstat()
        except FileNotFoundError:
            self._forget(path)
            return None
        signature = (st.st_size, st.st_mtime_ns)
        retry = self._untakeable.get(path)
        if self._waiting_to_retry(path):
            return None
        try:
            quest_id = self.queue.admit(path, priority or priority_for(path, self.realm.inbox))
        except FileNotFoundError:  # gone before we took it
            self._forget(path)
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. no permission to move it: this file only, retried
            attempts = retry.attempts + 1 if retry is not None and retry.signature == signature else 1
            delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (attempts - 1))
            self._untakeable[path] = _Retry(signature, attempts, self.clock() + delay)
            message = f"cannot take {shown} from the inbox: {type(exc).__name__}: {exc}"
            if attempts == 1:
                log.error("%s; retrying in %.0f s, then less often", message, delay)
                self.ledger.event("ingest_error", f"{message} (retried every {delay:.0f} s, doubling up to "
                                  f"{RETRY_MAX_SECONDS:.0f} s)", level="error", path=printable_name(str(path)))
            else:
                log.warning("%s (attempt %d; next in %.0f s)", message, attempts, delay)
            return None
        if retry is not None:
            self.ledger.event("ingest_recovered", f"{shown} taken from the inbox after {retry.attempts} failed "
                              "attempt(s)", quest_id=quest_id)
        self._forget(path)
        self.validate(quest_id)
        return quest_id

    def _waiting_to_retry(self, path: Path) -> bool:
        """True while ``path`` failed to be taken, is unchanged since, and its back-off has not passed."""
        retry = self._untakeable.get(path)
        if retry is None or self.clock() >= retry.next_at:
            return False
        try:
            st = path.lstat()
        except OSError:
            return False
        return retry.signature == (st.st_size, st.st_mtime_ns)

    def _forget(self, path: Path) -> None:
        self._untakeable.pop(path, None)
        self.scanner.forget(path)

    # validating -----------------------------------------------------------------------------------
    def validate(self, quest_id: int) -> None:
        """Validate a quest in ``validating``: queued, failed (with its report), or skipped as a duplicate.
        Any exception about the file fails that quest with the exception as its reason."""
        quest = self.ledger.get_quest(quest_id)
        if quest is None or quest["state"] != QuestState.VALIDATING.value:
            return
        try:
            self._validate(quest)
            return
        except Exception as exc:  # noqa: BLE001 - one file's problem: that quest fails, the thread goes on
            log.exception("validating quest %s (%s) raised", quest_id, quest["name"])
            reason = f"validation raised {type(exc).__name__}: {exc}"
        try:
            self._reject(self.ledger.get_quest(quest_id) or quest, reason)
        except Exception as exc:  # noqa: BLE001 - e.g. its file vanished from queue/validating/
            self._stuck.add(quest_id)
            log.exception("quest %s stays in validating", quest_id)
            self.ledger.event("validation_error", f"{quest['name']} could not be validated ({reason}) nor "
                              f"failed ({type(exc).__name__}: {exc}): it stays in validating until the next "
                              "start", level="error", quest_id=quest_id)

    def _validate(self, quest: dict[str, Any]) -> None:
        path = self.queue.path_of(quest)
        self.queue.verdicts_path_of(quest).unlink(missing_ok=True)  # validated again: the old verdict goes
        self.queue.reference_path_of(quest).unlink(missing_ok=True)  # and the reference of its old content
        kind = entry_kind(path.lstat())
        if kind == "symbolic link":
            return self._reject(quest, "symbolic links are not accepted: drop the file itself")
        if kind != "file":
            return self._reject(quest, _not_a_file(kind))
        verdicts = RecordVerdicts()
        max_length = self.config.training.max_length
        report = validate_file(path, display_name=quest["name"], config=self.config, verdicts=verdicts,
                               count_tokens_batch=lambda examples: measure_batch(examples, self.tokenizer,
                                                                                 max_length),
                               school=stage_school_of(self.ledger, quest["name"]),
                               school_check=school_check(self.realm, self.config, self.tokenizer))
        report_path = self.queue.report_path_of(quest)
        write_report(report, report_path)
        info = report.to_dict()
        fields = dict(format=info.get("format"), content_hash=info.get("content_hash"),
                      records=info.get("lines"), bad_records=info.get("records_bad"),
                      tokens=(info.get("tokens") or {}).get("total"), report_path=str(report_path.name))
        if not info["accepted"]:
            self._fail(quest, info.get("reason") or "rejected", **fields)
            return
        duplicate = self._duplicate_of(quest["id"], info.get("content_hash"))
        if duplicate is not None:
            note = f"identical to quest {duplicate['id']} ({duplicate['name']}, {duplicate['state']}): skipped"
            self.queue.transition(quest["id"], QuestState.SKIPPED, note=note, **fields)
            self.ledger.event("quest_skipped_duplicate", f"{quest['name']}: {note}", quest_id=quest["id"])
            return
        verdicts.save(self.queue.verdicts_path_of(quest))
        fields["examples_total"] = count_train_examples(info.get("examples") or 0,  # x epochs (schools.<glob>)
                                                        self.config.training.eval_holdout_every) \
            * quest_rule_for(quest["name"], self.config.schools).epochs
        self.queue.transition(quest["id"], QuestState.QUEUED, school=info.get("school"), **fields)
        self.ledger.event("quest_queued", f"{quest['name']} queued ({quest['priority']}, {info.get('format')}, "
                          f"school {info.get('school')}, "
                          f"{info.get('records_valid')} records, {info.get('examples')} to train)",
                          quest_id=quest["id"])

    def _reject(self, quest: dict[str, Any], reason: str) -> None:
        """Fail ``quest`` with ``reason`` and a report saying it (the file is never opened here)."""
        try:
            size = self.queue.path_of(quest).lstat().st_size
        except OSError:
            size = 0
        report = ValidationReport(file=quest["name"], reason=reason, size_bytes=size,
                                  max_length=self.config.training.max_length,
                                  length_policy=self.config.validation.length_policy,
                                  max_bad_line_ratio=self.config.validation.max_bad_line_ratio)
        report_path = self.queue.report_path_of(quest)
        try:
            write_report(report, report_path)
        except OSError as exc:
            log.error("cannot write the report of quest %s: %s", quest["id"], exc)
        self._fail(quest, reason, report_path=report_path.name if report_path.exists() else None)

    def _fail(self, quest: dict[str, Any], reason: str, **fields: Any) -> None:
        self.queue.transition(quest["id"], QuestState.FAILED, error=reason, **fields)
        self.ledger.event("quest_rejected", f"{quest['name']} rejected: {reason}", level="error",
                          quest_id=quest["id"])

    def _duplicate_of(self, quest_id: int, content_hash: str | None) -> dict[str, Any] | None:
        """A completed, queued or processing quest with the same content (``ingest.skip_duplicates``)."""
        if not content_hash or not self.config.ingest.skip_duplicates:
            return None
        rows = self.ledger.query(
            "SELECT * FROM quests WHERE content_hash=? AND id<>? AND state IN (?,?,?) ORDER BY id LIMIT 1",
            (content_hash, quest_id, QuestState.COMPLETED.value, QuestState.QUEUED.value,
             QuestState.PROCESSING.value))
        return rows[0] if rows else None


def _not_a_file(kind: str) -> str:
    if kind == "directory":
        return ("a directory, not a file: quests are dataset files (.jsonl, .json, .csv, .tsv, .parquet, .txt); "
                "put the files themselves into "
                "inbox/ (or inbox/high|normal|low/): other folders are not read")
    return (f"a {kind}, not a regular file: quests are dataset files (.jsonl, .json, .csv, .tsv, .parquet, .txt) "
            "written to disk (it was not opened)")
