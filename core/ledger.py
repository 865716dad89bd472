"""The SQLite ledger (WAL): quests, per-step metrics, evaluations, events, control commands, heartbeat.

One ledger per realm (``ledger.sqlite``). Every process (daemon, Tavern, CLI) opens its own
:class:`Ledger`; SQLite's WAL mode lets readers run beside the daemon's writer. Quest *state* changes go
through :mod:`core.quest_queue` only; this module stores rows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any


class QuestState(str, Enum):
    """States of a quest (a dropped file). Changed only by :class:`core.quest_queue.QuestQueue`."""

    VALIDATING = "validating"
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    SKIPPED = "skipped"
    FAILED = "failed"
    REMOVED = "removed"


class CommandState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


SCHEMA = """
CREATE TABLE IF NOT EXISTS quests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,              -- the file name the user dropped
    stored_name TEXT NOT NULL,       -- name inside queue/ folders: <id>-<name>
    state TEXT NOT NULL,
    priority TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    format TEXT,
    size_bytes INTEGER,
    records INTEGER,                 -- lines in the file
    bad_records INTEGER,
    examples_total INTEGER,          -- valid examples to train (excluding held-out)
    examples_trained INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER,                  -- tokens of the valid examples
    steps INTEGER NOT NULL DEFAULT 0,  -- optimizer steps spent on this quest
    first_global_step INTEGER,
    last_global_step INTEGER,
    report_path TEXT,
    note TEXT,
    error TEXT,
    deferred INTEGER NOT NULL DEFAULT 0,  -- 1 after a user skip: trained after the other queued quests
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS quests_state ON quests(state, priority, id);
CREATE INDEX IF NOT EXISTS quests_hash ON quests(content_hash);
CREATE TABLE IF NOT EXISTS steps (
    global_step INTEGER PRIMARY KEY,
    quest_id INTEGER,
    time REAL NOT NULL,
    loss REAL,
    learning_rate REAL,
    grad_norm REAL,
    tokens INTEGER,
    tokens_per_second REAL,
    example_start INTEGER,           -- examples [example_start, example_end) of the quest (indices into its
    example_end INTEGER,             -- train examples, file order) were consumed by this step
    examples_json TEXT               -- JSON list of line numbers (1-based) trained in this step
);
CREATE TABLE IF NOT EXISTS evals (
    global_step INTEGER NOT NULL,
    quest_id INTEGER,
    time REAL NOT NULL,
    eval_loss REAL NOT NULL,
    examples INTEGER NOT NULL,
    PRIMARY KEY (global_step, quest_id)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    level TEXT NOT NULL,             -- info | warning | error
    kind TEXT NOT NULL,              -- e.g. quest_queued, checkpoint_saved, crash
    message TEXT NOT NULL,
    data TEXT
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    command TEXT NOT NULL,           -- pause | resume | skip | stop
    args TEXT,
    state TEXT NOT NULL,
    result TEXT,
    handled_at REAL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

QUEST_COLUMNS = (
    "id", "name", "stored_name", "state", "priority", "attempts", "content_hash", "format", "size_bytes",
    "records", "bad_records", "examples_total", "examples_trained", "tokens", "steps", "first_global_step",
    "last_global_step", "report_path", "note", "error", "deferred", "created_at", "updated_at", "started_at", "finished_at",
    "source_url", "source_sha256",
)


INTEGRATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS downloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,               -- as the user gave it (http(s)://, hf://datasets/..., s3://, gs://)
    priority TEXT NOT NULL,
    state TEXT NOT NULL,             -- downloading | done | failed
    pid INTEGER,                     -- the downloading process
    part_path TEXT,                  -- the hidden .part file being written (absolute)
    path TEXT,                       -- the file published into the inbox (absolute), once done
    name TEXT,                       -- its file name
    sha256 TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,             -- announced size, when known
    error TEXT,
    quest_id INTEGER,                -- the quest the daemon made of it (set at admission)
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS downloads_path ON downloads(path);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook TEXT NOT NULL,           -- key of the receiver (core.webhooks.webhook_key: a hash of its url)
    url TEXT NOT NULL,
    event_id INTEGER NOT NULL,       -- events.id
    event TEXT NOT NULL,             -- webhook event name (quest_completed, level_up, ...)
    state TEXT NOT NULL,             -- pending | delivered | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,             -- HTTP status of the last attempt (NULL: no answer)
    error TEXT,                      -- why the last attempt failed
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (webhook, event_id)
);
"""
SOURCE_COLUMNS = {"source_url": "TEXT", "source_sha256": "TEXT"}


class DownloadState(str, Enum):
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Ledger:
    """A connection to the realm's ledger. Thread-safe (one connection guarded by a lock)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)
            self._migrate_integrations()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, params).fetchall()]

    def execute(self, sql: str, params: tuple | dict = ()) -> None:
        with self._lock:
            self._conn.execute(sql, params)

    # quests ------------------------------------------------------------------
    def get_quest(self, quest_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM quests WHERE id=?", (quest_id,))
        return rows[0] if rows else None

    def list_quests(self, states: list[QuestState] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if states:
            marks = ",".join("?" * len(states))
            return self.query(f"SELECT * FROM quests WHERE state IN ({marks}) ORDER BY id LIMIT ?",
                              (*[s.value for s in states], limit))
        return self.query("SELECT * FROM quests ORDER BY id LIMIT ?", (limit,))

    def update_quest(self, quest_id: int, **fields: Any) -> None:
        """Update non-state columns of a quest (state goes through QuestQueue)."""
        if "state" in fields:
            raise ValueError("quest state changes go through core.quest_queue.QuestQueue")
        bad = set(fields) - set(QUEST_COLUMNS)
        if bad:
            raise ValueError(f"unknown quest columns {sorted(bad)}")
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as c:
            c.execute(f"UPDATE quests SET {sets} WHERE id=?", (*fields.values(), quest_id))

    def queue_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in QuestState}
        for r in self.query("SELECT state, COUNT(*) AS n FROM quests GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    # steps and evals -----------------------------------------------------------
    def record_step(self, *, global_step: int, quest_id: int | None, loss: float, learning_rate: float,
                    grad_norm: float, tokens: int, tokens_per_second: float, example_start: int,
                    example_end: int, example_lines: list[int], quest_steps: int) -> None:
        """One optimizer step's metrics, and the quest's progress, in one transaction."""
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (global_step, quest_id, now, loss, learning_rate, grad_norm, tokens, tokens_per_second,
                 example_start, example_end, json.dumps(example_lines)),
            )
            if quest_id is not None:
                c.execute(
                    "UPDATE quests SET examples_trained=?, steps=?, last_global_step=?, "
                    "first_global_step=COALESCE(first_global_step, ?), updated_at=? WHERE id=?",
                    (example_end, quest_steps, global_step, global_step, now, quest_id),
                )

    def record_eval(self, global_step: int, quest_id: int | None, eval_loss: float, examples: int) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?)",
                      (global_step, quest_id, time.time(), eval_loss, examples))

    def rollback_to(self, global_step: int) -> int:
        """Forget steps and evals after ``global_step`` (their weights were lost with a crash), and set
        each affected quest's progress back to what its remaining steps consumed.

        Steps consume a quest's examples in order, so ``examples_trained`` = the largest remaining
        ``example_end`` of that quest (0 when none remain). Returns the number of step rows removed.
        """
        with self.transaction() as c:
            affected = [r[0] for r in c.execute(
                "SELECT DISTINCT quest_id FROM steps WHERE global_step > ? AND quest_id IS NOT NULL",
                (global_step,)).fetchall()]
            n = c.execute("DELETE FROM steps WHERE global_step > ?", (global_step,)).rowcount
            c.execute("DELETE FROM evals WHERE global_step > ?", (global_step,))
            for qid in affected:
                row = c.execute("SELECT MAX(example_end), COUNT(*), MIN(global_step), MAX(global_step) "
                                "FROM steps WHERE quest_id=?", (qid,)).fetchone()
                c.execute("UPDATE quests SET examples_trained=?, steps=?, first_global_step=?, "
                          "last_global_step=?, updated_at=? WHERE id=?",
                          (row[0] or 0, row[1], row[2], row[3], time.time(), qid))
        return n

    def last_step(self) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM steps ORDER BY global_step DESC LIMIT 1")
        return rows[0] if rows else None

    def steps(self, since_step: int = 0, limit: int = 100000) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM steps WHERE global_step > ? ORDER BY global_step LIMIT ?",
                          (since_step, limit))

    def evals(self, quest_id: int | None = None) -> list[dict[str, Any]]:
        if quest_id is None:
            return self.query("SELECT * FROM evals ORDER BY global_step")
        return self.query("SELECT * FROM evals WHERE quest_id=? ORDER BY global_step", (quest_id,))

    # events ------------------------------------------------------------------
    def event(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (time.time(), level, kind, message, json.dumps(data, default=str) if data else None))

    def events(self, since_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since_id, limit))

    # control channel -----------------------------------------------------------
    def send_command(self, command: str, **args: Any) -> int:
        """Queue a control command for the daemon (pause, resume, skip, stop). Returns its id."""
        with self.transaction() as c:
            cur = c.execute("INSERT INTO commands(time, command, args, state) VALUES (?,?,?,?)",
                            (time.time(), command, json.dumps(args), CommandState.PENDING.value))
            return int(cur.lastrowid)

    def pending_commands(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM commands WHERE state=? ORDER BY id", (CommandState.PENDING.value,))

    def finish_command(self, command_id: int, state: CommandState, result: str = "") -> None:
        with self.transaction() as c:
            c.execute("UPDATE commands SET state=?, result=?, handled_at=? WHERE id=?",
                      (state.value, result, time.time(), command_id))

    # key/value (heartbeat, daemon state) ----------------------------------------
    def set_value(self, key: str, value: Any) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, json.dumps(value), time.time()))

    def get_value(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM kv WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def get_value_with_time(self, key: str) -> tuple[Any, float | None]:
        rows = self.query("SELECT value, updated_at FROM kv WHERE key=?", (key,))
        return (json.loads(rows[0]["value"]), rows[0]["updated_at"]) if rows else (None, None)

    # --- integrations: downloads into the inbox (core.sources), webhook deliveries (core.webhooks) ---------

    def _migrate_integrations(self) -> None:
        """Create the integration tables and add ``quests.source_url``/``source_sha256`` to an older ledger."""
        self._conn.executescript(INTEGRATIONS_SCHEMA)
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(quests)").fetchall()}
        for column, sql_type in SOURCE_COLUMNS.items():
            if column not in have:
                try:
                    self._conn.execute(f"ALTER TABLE quests ADD COLUMN {column} {sql_type}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

    # downloads ------------------------------------------------------------------------------------
    def start_download(self, url: str, priority: str, part_path: str, pid: int) -> int:
        """A download into the inbox begins. Returns its id."""
        now = time.time()
        with self.transaction() as c:
            cur = c.execute("INSERT INTO downloads(url, priority, state, pid, part_path, created_at, updated_at) "
                            "VALUES (?,?,?,?,?,?,?)", (url, priority, DownloadState.DOWNLOADING.value, pid,
                                                        part_path, now, now))
            return int(cur.lastrowid)

    def download_progress(self, download_id: int, bytes_done: int, bytes_total: int | None) -> None:
        with self.transaction() as c:
            c.execute("UPDATE downloads SET bytes_done=?, bytes_total=?, updated_at=? WHERE id=?",
                      (bytes_done, bytes_total, time.time(), download_id))

    def finish_download(self, download_id: int, *, path: str, name: str, sha256: str,
                        size_bytes: int) -> None:
        """The file was published into the inbox as ``path`` (absolute)."""
        with self.transaction() as c:
            c.execute("UPDATE downloads SET state=?, path=?, name=?, sha256=?, bytes_done=?, bytes_total=?, "
                      "part_path=NULL, updated_at=? WHERE id=?",
                      (DownloadState.DONE.value, path, name, sha256, size_bytes, size_bytes, time.time(),
                       download_id))

    def fail_download(self, download_id: int, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE downloads SET state=?, error=?, part_path=NULL, updated_at=? WHERE id=?",
                      (DownloadState.FAILED.value, error, time.time(), download_id))

    def get_download(self, download_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM downloads WHERE id=?", (download_id,))
        return rows[0] if rows else None

    def list_downloads(self, limit: int = 50, state: DownloadState | None = None) -> list[dict[str, Any]]:
        """The newest downloads first."""
        if state is not None:
            return self.query("SELECT * FROM downloads WHERE state=? ORDER BY id DESC LIMIT ?", (state.value, limit))
        return self.query("SELECT * FROM downloads ORDER BY id DESC LIMIT ?", (limit,))

    def link_download(self, quest_id: int, inbox_path: str) -> dict[str, Any] | None:
        """Called when a file is admitted from the inbox as quest ``quest_id``: if a finished download
        published it at ``inbox_path``, record its URL and SHA-256 on the quest (``source_url``,
        ``source_sha256``) and the quest on the download. Returns the download row, or None."""
        with self.transaction() as c:
            row = c.execute("SELECT * FROM downloads WHERE path=? AND state=? AND quest_id IS NULL "
                            "ORDER BY id DESC LIMIT 1", (inbox_path, DownloadState.DONE.value)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE downloads SET quest_id=?, updated_at=? WHERE id=?", (quest_id, time.time(), row["id"]))
            c.execute("UPDATE quests SET source_url=?, source_sha256=? WHERE id=?",
                      (row["url"], row["sha256"], quest_id))
        return dict(row)

    def queued_by_priority(self) -> dict[str, int]:
        """``{priority: queued quests}`` (priorities with none are absent)."""
        rows = self.query("SELECT priority, COUNT(*) AS n FROM quests WHERE state=? GROUP BY priority",
                          (QuestState.QUEUED.value,))
        return {r["priority"]: r["n"] for r in rows}

    # events, as webhooks and metrics read them -----------------------------------------------------
    def max_event_id(self) -> int:
        return int(self.query("SELECT COALESCE(MAX(id), 0) AS n FROM events")[0]["n"])

    def next_event(self, after_id: int, kinds: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The oldest event with ``id > after_id`` whose kind is one of ``kinds``, or None."""
        if not kinds:
            return None
        marks = ",".join("?" * len(kinds))
        rows = self.query(f"SELECT * FROM events WHERE id > ? AND kind IN ({marks}) ORDER BY id LIMIT 1",
                          (after_id, *kinds))
        return rows[0] if rows else None

    def event_with_value(self, kind: str, message: str, key: str, value: Any, level: str = "info",
                         **data: Any) -> None:
        """An event and a kv value in one transaction (e.g. a level-up and the level it announced)."""
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (now, level, kind, message, json.dumps(data, default=str) if data else None))
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, json.dumps(value), now))

    def last_event(self, kind: str) -> dict[str, Any] | None:
        """The newest event of ``kind``, or None."""
        rows = self.query("SELECT * FROM events WHERE kind=? ORDER BY id DESC LIMIT 1", (kind,))
        return rows[0] if rows else None

    # webhook deliveries ----------------------------------------------------------------------------
    def webhook_delivery(self, webhook: str, url: str, event_id: int, event: str) -> dict[str, Any]:
        """The delivery row of ``event_id`` to receiver ``webhook``, created (pending) if new."""
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO webhook_deliveries(webhook, url, event_id, event, state, "
                      "created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                      (webhook, url, event_id, event, DeliveryState.PENDING.value, now, now))
            return dict(c.execute("SELECT * FROM webhook_deliveries WHERE webhook=? AND event_id=?",
                                  (webhook, event_id)).fetchone())

    def webhook_attempt(self, delivery_id: int, *, state: DeliveryState, status_code: int | None,
                        error: str | None, next_attempt_at: float | None = None,
                        position_key: str | None = None) -> None:
        """Record one attempt of a delivery. When it ends the delivery (delivered, or failed for good) the
        receiver's position (kv ``position_key``) moves to its event, in the same transaction."""
        now = time.time()
        with self.transaction() as c:
            row = c.execute("SELECT event_id FROM webhook_deliveries WHERE id=?", (delivery_id,)).fetchone()
            c.execute("UPDATE webhook_deliveries SET state=?, attempts=attempts+1, status_code=?, error=?, "
                      "next_attempt_at=?, updated_at=?, delivered_at=? WHERE id=?",
                      (state.value, status_code, error, next_attempt_at, now,
                       now if state == DeliveryState.DELIVERED else None, delivery_id))
            if position_key and row is not None and state != DeliveryState.PENDING:
                c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (position_key, json.dumps(row[0]), now))

    def webhook_deliveries(self, limit: int = 100, webhook: str | None = None) -> list[dict[str, Any]]:
        """Delivery rows, oldest first among the newest ``limit``."""
        if webhook is not None:
            rows = self.query("SELECT * FROM webhook_deliveries WHERE webhook=? ORDER BY id DESC LIMIT ?",
                              (webhook, limit))
        else:
            rows = self.query("SELECT * FROM webhook_deliveries ORDER BY id DESC LIMIT ?", (limit,))
        return rows[::-1]
