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
from dataclasses import dataclass, field
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
""" + """
-- skills: promotion trials (see the "skills" section at the end of this module)
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    hero TEXT NOT NULL,
    skill TEXT NOT NULL,
    level INTEGER NOT NULL,          -- the level the items were drawn at
    level_after INTEGER NOT NULL,    -- the skill's level after this trial (level + 1 when promoted)
    n INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    lower_bound REAL NOT NULL,       -- Wilson 95% lower bound of the accuracy
    threshold REAL NOT NULL,
    promoted INTEGER NOT NULL,
    global_step INTEGER NOT NULL,    -- of the weights answering
    checkpoint TEXT,
    seed INTEGER NOT NULL,
    duration_seconds REAL NOT NULL,
    samples_json TEXT NOT NULL       -- [{prompt, expected, answer, correct}, ...]
);
CREATE INDEX IF NOT EXISTS trials_skill ON trials(hero, skill, id);
"""

QUEST_COLUMNS = (
    "id", "name", "stored_name", "state", "priority", "attempts", "content_hash", "format", "size_bytes",
    "records", "bad_records", "examples_total", "examples_trained", "tokens", "steps", "first_global_step",
    "last_global_step", "report_path", "note", "error", "deferred", "created_at", "updated_at", "started_at", "finished_at",
)


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

    # =============================================================================================
    # skills: promotion trials and skill levels (issue 10; core.skills.trials writes, status reads)
    # =============================================================================================
    def record_trial(self, trial: TrialRecord) -> int:
        """Store a trial, with its ``trial`` event and, when promoted, a ``promotion`` event, in one
        transaction. Returns the trial's id."""
        t = trial
        now = t.time or time.time()
        verdict = (f"promoted to level {t.level_after}" if t.promoted else
                   f"stays at level {t.level_after}")
        message = (f"{t.skill} level {t.level} trial at step {t.global_step}: {t.correct}/{t.n} right "
                   f"({100 * t.accuracy:.1f}%), Wilson lower bound {t.lower_bound:.3f} "
                   f"{'>=' if t.lower_bound >= t.threshold else '<'} {t.threshold}: {verdict}")
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO trials(time, hero, skill, level, level_after, n, correct, accuracy, lower_bound, "
                "threshold, promoted, global_step, checkpoint, seed, duration_seconds, samples_json) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (now, t.hero, t.skill, t.level, t.level_after, t.n, t.correct, t.accuracy, t.lower_bound,
                 t.threshold, int(t.promoted), t.global_step, t.checkpoint, t.seed, t.duration_seconds,
                 json.dumps(t.samples)))
            trial_id = int(cur.lastrowid)
            data = {"trial_id": trial_id, "hero": t.hero, "skill": t.skill, "level": t.level,
                    "level_after": t.level_after, "n": t.n, "correct": t.correct, "accuracy": t.accuracy,
                    "lower_bound": t.lower_bound, "threshold": t.threshold, "promoted": t.promoted,
                    "global_step": t.global_step, "checkpoint": t.checkpoint}
            c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                      (now, "info", "trial", message, json.dumps(data)))
            if t.promoted:
                c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                          (now, "info", "promotion", f"{t.skill}: level {t.level} -> {t.level_after} "
                           f"(trial #{trial_id}, {t.correct}/{t.n} right at step {t.global_step})",
                           json.dumps({**data, "from_level": t.level})))
        return trial_id

    def trials(self, hero: str, skill: str | None = None, limit: int = 100) -> list[TrialRecord]:
        """The newest ``limit`` trials of ``hero`` (of one ``skill``, or all), oldest first."""
        where, params = ("hero=? AND skill=?", (hero, skill)) if skill is not None else ("hero=?", (hero,))
        rows = self.query(f"SELECT * FROM (SELECT * FROM trials WHERE {where} ORDER BY id DESC LIMIT ?) "
                          "ORDER BY id", (*params, limit))
        return [TrialRecord.from_row(r) for r in rows]

    def count_trials(self, hero: str, skill: str, level: int, global_step: int) -> int:
        """Trials of ``skill`` at ``level`` on the weights of ``global_step`` (the attempt number of the next)."""
        rows = self.query("SELECT COUNT(*) AS n FROM trials WHERE hero=? AND skill=? AND level=? AND global_step=?",
                          (hero, skill, level, global_step))
        return int(rows[0]["n"])

    def last_trial(self, hero: str, skill: str) -> TrialRecord | None:
        rows = self.query("SELECT * FROM trials WHERE hero=? AND skill=? ORDER BY id DESC LIMIT 1", (hero, skill))
        return TrialRecord.from_row(rows[0]) if rows else None

    def skill_level(self, hero: str, skill: str) -> int:
        """The skill's level: ``level_after`` of its newest trial, 0 before any trial."""
        last = self.last_trial(hero, skill)
        return last.level_after if last else 0

    def skill_summary(self, hero: str) -> dict[str, dict[str, Any]]:
        """Per skill with a trial: ``{"level", "trials", "last_trial": TrialRecord}``."""
        out: dict[str, dict[str, Any]] = {}
        for r in self.query("SELECT skill, COUNT(*) AS n, MAX(id) AS last FROM trials WHERE hero=? "
                            "GROUP BY skill ORDER BY skill", (hero,)):
            last = TrialRecord.from_row(self.query("SELECT * FROM trials WHERE id=?", (r["last"],))[0])
            out[r["skill"]] = {"level": last.level_after, "trials": r["n"], "last_trial": last}
        return out

    def forget_trials_after(self, global_step: int) -> int:
        """Delete trials of weights after ``global_step`` (lost with a crash, like :meth:`rollback_to`'s
        steps), so no level rests on weights that no longer exist. Returns the number removed."""
        with self.transaction() as c:
            return c.execute("DELETE FROM trials WHERE global_step > ?", (global_step,)).rowcount

    def set_skill_load_errors(self, errors: list[dict[str, str]]) -> None:
        """The problems of the last skill registry built (``[{"source", "message"}]``), and a
        ``skill_error`` warning event for each one not stored before."""
        before = {(e.get("source"), e.get("message")) for e in self.skill_load_errors()}
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (SKILL_ERRORS_KEY, json.dumps(errors), time.time()))
            for e in errors:
                if (e.get("source"), e.get("message")) not in before:
                    c.execute("INSERT INTO events(time, level, kind, message, data) VALUES (?,?,?,?,?)",
                              (time.time(), "warning", "skill_error", f"skill {e['source']}: "
                               f"{e['message'].strip().splitlines()[-1][:300]}", json.dumps(e)))

    def skill_load_errors(self) -> list[dict[str, str]]:
        return self.get_value(SKILL_ERRORS_KEY, []) or []


SKILL_ERRORS_KEY = "skills/load_errors"


@dataclass(frozen=True)
class TrialRecord:
    """One promotion trial (a row of ``trials``). ``accuracy`` = correct / n; ``lower_bound``: Wilson 95%
    lower bound (:func:`core.skills.stats.wilson_lower_bound`); ``samples``: a few answers as
    ``{"prompt", "expected", "answer", "correct"}``; ``time``: Unix seconds (0: now, when recorded)."""

    hero: str
    skill: str
    level: int
    level_after: int
    n: int
    correct: int
    accuracy: float
    lower_bound: float
    threshold: float
    promoted: bool
    global_step: int
    checkpoint: str | None
    seed: int
    duration_seconds: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    time: float = 0.0
    id: int | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrialRecord:
        return cls(hero=row["hero"], skill=row["skill"], level=row["level"], level_after=row["level_after"],
                   n=row["n"], correct=row["correct"], accuracy=row["accuracy"], lower_bound=row["lower_bound"],
                   threshold=row["threshold"], promoted=bool(row["promoted"]), global_step=row["global_step"],
                   checkpoint=row["checkpoint"], seed=row["seed"], duration_seconds=row["duration_seconds"],
                   samples=json.loads(row["samples_json"]), time=row["time"], id=row["id"])

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
