"""The durable quest queue: folders show state, the ledger records it, one method changes it.

Every state change is one atomic step: a ledger transaction that updates the row and, inside it, a
``rename`` of the data file (and its sidecars: ``.report.json``, and ``.records``, the per-record verdict of
:mod:`core.records`) into the state's folder. If the rename fails the
transaction rolls back; if the process dies between rename and commit, :meth:`QuestQueue.reconcile`
trusts the folder at the next start.

Order of training: quests already ``processing`` (resume), then ``queued`` by priority high -> normal ->
low, oldest (lowest id) first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.ledger import Ledger, QuestState
from core.realm import PRIORITIES, Realm
from core.records import RECORDS_SUFFIX
from core.schools import REFERENCE_SUFFIX

REPORT_SUFFIX = ".report.json"
SIDECAR_SUFFIXES = (REPORT_SUFFIX, RECORDS_SUFFIX, REFERENCE_SUFFIX)
"""Files that live beside a quest's data file and move with it."""
MAX_STORED_NAME_BYTES = 200
"""Longest stored name (UTF-8 bytes): with ``.report.json`` and a temporary-file suffix it stays within the
filesystem's 255-byte name limit. Longer dropped names are shortened, keeping their extension."""


def printable_name(name: str) -> str:
    """``name`` as text that can be stored and shown anywhere: bytes that are not UTF-8 (a file name read
    from disk carries them as lone surrogates, PEP 383) become ``\\xNN`` escapes, as ``ls -b`` shows them;
    a valid name is returned unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def stored_name_for(quest_id: int, name: str) -> str:
    """``<id>-<name>`` (id zero-padded to 6 digits), the name shortened to fit :data:`MAX_STORED_NAME_BYTES`."""
    prefix = f"{quest_id:06d}-"
    stored = prefix + name
    if len(stored.encode("utf-8", "surrogateescape")) <= MAX_STORED_NAME_BYTES:
        return stored
    suffix = "".join(Path(name).suffixes)
    suffix = suffix if len(suffix.encode("utf-8", "surrogateescape")) <= 20 else ""
    keep = MAX_STORED_NAME_BYTES - len(prefix) - len(suffix.encode("utf-8", "surrogateescape")) - 1
    stem = name.encode("utf-8", "surrogateescape")[:keep].decode("utf-8", "ignore")
    return f"{prefix}{stem}~{suffix}"

ALLOWED: dict[QuestState, set[QuestState]] = {
    QuestState.VALIDATING: {QuestState.QUEUED, QuestState.FAILED, QuestState.SKIPPED, QuestState.VALIDATING},
    # queued/processing -> validating: the file changed after validation (core.records.verify_unchanged)
    QuestState.QUEUED: {QuestState.PROCESSING, QuestState.QUEUED, QuestState.REMOVED, QuestState.VALIDATING},
    QuestState.PROCESSING: {QuestState.COMPLETED, QuestState.QUEUED, QuestState.FAILED, QuestState.VALIDATING},
    QuestState.FAILED: {QuestState.QUEUED, QuestState.REMOVED},
    # completed -> queued: only when the checkpoint holding its last steps was lost (Daemon._reopen_lost_quests)
    QuestState.COMPLETED: {QuestState.REMOVED, QuestState.QUEUED},
    QuestState.SKIPPED: {QuestState.REMOVED, QuestState.QUEUED},
    QuestState.REMOVED: {QuestState.QUEUED},
}


class QuestStateError(RuntimeError):
    """Raised on a transition the state machine does not allow, or for an unknown quest."""


def folder_name(state: QuestState, priority: str) -> str:
    return {
        QuestState.VALIDATING: "validating",
        QuestState.QUEUED: priority,
        QuestState.PROCESSING: "processing",
        QuestState.COMPLETED: "recently_completed",
        QuestState.SKIPPED: "recently_completed",
        QuestState.FAILED: "failed",
        QuestState.REMOVED: "trash",
    }[state]


class QuestQueue:
    """State machine of quests over a :class:`Realm`'s queue folders and its :class:`Ledger`."""

    def __init__(self, realm: Realm, ledger: Ledger):
        self.realm = realm
        self.ledger = ledger

    # paths ---------------------------------------------------------------------
    def path_of(self, quest: dict[str, Any]) -> Path:
        """Where the quest's data file is now, by its ledger state."""
        folder = folder_name(QuestState(quest["state"]), quest["priority"])
        return self.realm.queue_dir(folder) / quest["stored_name"]

    def report_path_of(self, quest: dict[str, Any]) -> Path:
        p = self.path_of(quest)
        return p.with_name(p.name + REPORT_SUFFIX)

    def reference_path_of(self, quest: dict[str, Any]) -> Path:
        """The quest's reference log-probs sidecar (:mod:`core.schools.reference`), beside its file."""
        p = self.path_of(quest)
        return p.with_name(p.name + REFERENCE_SUFFIX)

    def verdicts_path_of(self, quest: dict[str, Any]) -> Path:
        """The quest's per-record verdict (:mod:`core.records`), beside its data file."""
        p = self.path_of(quest)
        return p.with_name(p.name + RECORDS_SUFFIX)

    # admission -------------------------------------------------------------------
    def admit(self, source: Path, priority: str = "normal", name: str | None = None) -> int:
        """Take ``source`` (a settled file, e.g. in inbox/) into ``queue/validating/`` as a new quest.

        The file is renamed (same filesystem) or copied then removed, so the inbox never holds it twice.
        ``name`` (default: the file's) is stored through :func:`printable_name`. Returns the quest id.
        Raises ``ValueError`` for an unknown priority, ``OSError`` when the file cannot be moved.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        name = printable_name(name or source.name)
        now = time.time()
        try:
            size = source.stat().st_size
        except FileNotFoundError:
            if not source.is_symlink():
                raise
            size = source.lstat().st_size  # a dangling symbolic link: taken, then rejected by validation
        with self.ledger.transaction() as c:
            cur = c.execute(
                "INSERT INTO quests(name, stored_name, state, priority, size_bytes, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?)",
                (name, "", QuestState.VALIDATING.value, priority, size, now, now),
            )
            quest_id = int(cur.lastrowid)
            stored = stored_name_for(quest_id, name)
            c.execute("UPDATE quests SET stored_name=? WHERE id=?", (stored, quest_id))
            dest = self.realm.queue_dir("validating") / stored
            _move(source, dest)
        if _utf8(str(source)):  # downloads are published under UTF-8 names; another name was no download
            self.ledger.link_download(quest_id, str(source))  # a file enqueued from a URL: its source_url, sha256
        self.ledger.event("quest_admitted", f"{name} taken from the inbox as quest {quest_id}",
                          quest_id=quest_id, priority=priority)
        return quest_id

    # the one place that changes state ---------------------------------------------
    def transition(self, quest_id: int, to_state: QuestState, *, priority: str | None = None,
                   expect: QuestState | None = None, **fields: Any) -> dict[str, Any]:
        """Move quest ``quest_id`` to ``to_state`` (and optionally a new ``priority``), updating ``fields``.

        Raises :class:`QuestStateError` for an unknown quest, a transition not in :data:`ALLOWED`, or when
        ``expect`` is given and the quest is in another state. Returns the updated row.
        """
        if priority is not None and priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        now = time.time()
        with self.ledger.transaction() as c:
            row = c.execute("SELECT * FROM quests WHERE id=?", (quest_id,)).fetchone()
            if row is None:
                raise QuestStateError(f"no quest {quest_id}")
            quest = dict(row)
            current = QuestState(quest["state"])
            if expect is not None and current != expect:
                raise QuestStateError(f"quest {quest_id} is {current.value}, expected {expect.value}")
            if to_state not in ALLOWED[current]:
                raise QuestStateError(f"quest {quest_id}: {current.value} -> {to_state.value} is not allowed")
            src = self.path_of(quest)
            updated = {**quest, **fields, "state": to_state.value, "priority": priority or quest["priority"],
                       "updated_at": now}
            if to_state == QuestState.PROCESSING and not quest["started_at"]:
                updated["started_at"] = now
            if to_state in (QuestState.COMPLETED, QuestState.FAILED, QuestState.SKIPPED):
                updated["finished_at"] = now
            cols = [k for k in updated if k != "id"]
            c.execute(f"UPDATE quests SET {', '.join(f'{k}=?' for k in cols)} WHERE id=?",
                      (*[updated[k] for k in cols], quest_id))
            dst = self.path_of(updated)
            if src != dst:
                _move(src, dst)
                for suffix in SIDECAR_SUFFIXES:
                    side = src.with_name(src.name + suffix)
                    if side.exists():
                        _move(side, dst.with_name(dst.name + suffix))
        return updated

    # selection -----------------------------------------------------------------
    def next_trainable(self, trainable_formats: set[str],
                       last: Callable[[dict[str, Any]], bool] | None = None,
                       first: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """The quest to train next, or None: a ``processing`` one first, then queued quests by priority and
        age (lowest id), quests the user skipped (``deferred``) after all others -- and queued quests for
        which ``last(quest)`` is true (generated ones, :func:`core.skills.loop.is_generated`) after those;
        queued quests for which ``first(quest)`` is true (the campaign stage's, :mod:`core.campaigns`)
        before all of them."""
        rows = self.ledger.list_quests([QuestState.PROCESSING])
        rows = [r for r in rows if r["format"] in trainable_formats]
        if rows:
            return rows[0]
        order = {p: i for i, p in enumerate(PRIORITIES)}
        queued = [r for r in self.ledger.list_quests([QuestState.QUEUED], limit=100000)
                  if r["format"] in trainable_formats]
        queued.sort(key=lambda r: (not (first and first(r)), bool(last and last(r)), r["deferred"],
                                   order[r["priority"]], r["id"]))
        return queued[0] if queued else None

    def waiting(self, trainable_formats: set[str]) -> list[dict[str, Any]]:
        """Queued quests whose format no school trains yet (e.g. preference data before DPO)."""
        return [r for r in self.ledger.list_quests([QuestState.QUEUED], limit=100000)
                if r["format"] not in trainable_formats]

    # recovery -------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Make the ledger agree with the folders after a crash between rename and commit.

        A quest whose file is not where its state says but is found in another state's folder gets that
        state (the rename happened, the commit did not). Returns notes on what was fixed.
        """
        notes: list[str] = []
        for quest in self.ledger.list_quests(limit=10**9):
            where = self.path_of(quest)
            if where.exists():
                continue
            for state in QuestState:
                for prio in PRIORITIES:
                    cand = self.realm.queue_dir(folder_name(state, prio)) / quest["stored_name"]
                    if cand.exists():
                        with self.ledger.transaction() as c:
                            c.execute("UPDATE quests SET state=?, priority=?, updated_at=? WHERE id=?",
                                      (state.value, prio if state == QuestState.QUEUED else quest["priority"],
                                       time.time(), quest["id"]))
                        notes.append(f"quest {quest['id']}: file found in {cand.parent.name}/, state set to "
                                     f"{state.value}")
                        break
                else:
                    continue
                break
        for note in notes:
            self.ledger.event("queue_reconciled", note, level="warning")
        return notes


def _move(src: Path, dst: Path) -> None:
    """Atomic rename; never overwrites (raises FileExistsError)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; refusing to overwrite")
    os.rename(src, dst)


def _utf8(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (a file name with undecodable bytes holds lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
