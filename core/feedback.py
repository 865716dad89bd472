"""The feedback loop: people's ratings and choices become Judge quests, scored before and after.

Feedback is the ledger's ``preferences`` rows (:mod:`core.preferences`): 👍/👎 ratings and
regenerate-and-pick pairs given on the Oracle page or through ``POST /v1/feedback``. With
``feedback.enabled`` the daemon (:class:`FeedbackLoop`, called between quests and between optimizer steps)
turns them into quests:

* **pairs** -> a DPO quest ``feedback-pairs-<N>.jsonl`` once the unused pairs hold ``feedback.min_pairs``
  pairs to train; **ratings** -> a KTO quest ``feedback-ratings-<N>.jsonl`` once ``feedback.min_ratings``
  unused ratings exist. ``N`` is the Judge quest number (1, 2, ... over both kinds). Records are TRL's
  conversational forms (:func:`core.preferences.preference_records`, :func:`~core.preferences.rating_records`),
  so the chat template applies; the school follows from the format (or a ``config.schools`` rule for
  ``feedback-pairs-*``, e.g. IPO).
* **Held out:** pairs are taken in the order given (ledger id); the 1st, ``(k+1)``-th, ``(2k+1)``-th ... pair
  ever taken (``k = feedback.holdout_every``; 0: none) is kept back, never trained. A Judge quest is scored
  on the newest ``feedback.max_held_out_pairs`` pairs kept back up to and including its own batch, written
  to ``feedback/held-out-<N>.jsonl`` in the realm (so ``python -m training eval`` repeats the number on any
  checkpoint).
* **Exactly once:** in one ledger transaction the batch's rows are marked used (``feedback_uses``: the quest
  number, train or held out) and the quest is recorded as ``claimed`` (``feedback_quests``); then the file is
  written into ``inbox/<feedback.priority>/`` atomically (hidden temporary file, fsync, rename) and the quest
  becomes ``written``. A crash between the two is finished at the next start (:meth:`FeedbackLoop.start`):
  the file is written then, unless it is already in the inbox or the ledger has the quest. No record is
  dropped or trained twice.
* **Scored:** when the quest starts, the live weights (the checkpoint it starts from) score the held-out
  pairs; when it completes, the weights of its end checkpoint score them again, with the rule of
  ``python -m training eval`` (:func:`core.evaluation.preference_metrics`: share of pairs with
  ``log p(chosen) > log p(rejected)``, response tokens only). The battle log gets
  ``Judge quest #N: preference accuracy 0.62 → 0.81`` (event ``judge_quest_scored``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.config import FeedbackConfig, RealmConfig
from core.fsutil import write_text_atomic
from core.ledger import Ledger
from core.realm import Realm

FEEDBACK_FOLDER = "feedback"
"""Folder of the realm holding the held-out files ``held-out-<N>.jsonl``."""
QUEST_GLOB = "feedback-*-[0-9]*.jsonl"
POLL_INTERVAL_SECONDS = 1.0

KINDS = {"pair": "pairs", "rating": "ratings"}


def quest_name(kind: str, number: int) -> str:
    """``feedback-pairs-0001.jsonl`` / ``feedback-ratings-0002.jsonl``."""
    return f"feedback-{KINDS[kind]}-{number:04d}.jsonl"


def held_out_path(realm: Realm, number: int) -> Path:
    """``<realm>/feedback/held-out-<N>.jsonl``: the pairs Judge quest ``N`` is scored on."""
    return realm.root / FEEDBACK_FOLDER / f"held-out-{number:04d}.jsonl"


def is_held_out(position: int, holdout_every: int) -> bool:
    """Whether the ``position``-th pair ever taken (1-based) is kept back: positions 1, k+1, 2k+1, ...
    with ``k = holdout_every`` (0: never)."""
    return holdout_every > 0 and (position - 1) % holdout_every == 0


def train_count(taken_before: int, new: int, holdout_every: int) -> int:
    """Pairs to train among ``new`` pairs taken after ``taken_before`` others."""
    return sum(not is_held_out(taken_before + i, holdout_every) for i in range(1, new + 1))


def pairs_until_next(taken_before: int, unused: int, cfg: FeedbackConfig) -> int:
    """More pairs needed until the unused ones hold ``cfg.min_pairs`` to train (0: due now)."""
    more = 0
    while train_count(taken_before, unused + more, cfg.holdout_every) < cfg.min_pairs:
        more += 1
    return more


def _unused_ids(c, kind: str) -> list[int]:
    return [r[0] for r in c.execute(
        "SELECT p.id FROM preferences p LEFT JOIN feedback_uses u ON u.preference_id = p.id "
        "WHERE p.kind=? AND u.preference_id IS NULL ORDER BY p.id", (kind,))]


def _taken(c, kind: str) -> int:
    return c.execute("SELECT COUNT(*) FROM feedback_uses WHERE kind=?", (kind,)).fetchone()[0]


def feedback_status(ledger: Ledger, cfg: FeedbackConfig, recent: int = 10) -> dict[str, Any]:
    """What the Tavern shows: ``enabled``, ``min_pairs``, ``min_ratings``, ``new_pairs``, ``new_ratings``
    (unused), ``pairs_until_next``, ``ratings_until_next``, ``held_out_pairs`` and the ``recent`` newest
    Judge quests (rows of ``feedback_quests``, newest first)."""
    new = {r["kind"]: r["n"] for r in ledger.query(
        "SELECT p.kind AS kind, COUNT(*) AS n FROM preferences p LEFT JOIN feedback_uses u ON u.preference_id = p.id "
        "WHERE u.preference_id IS NULL GROUP BY p.kind")}
    new_pairs, new_ratings = new.get("pair", 0), new.get("rating", 0)
    used = {(r["kind"], r["role"]): r["n"] for r in ledger.query(
        "SELECT kind, role, COUNT(*) AS n FROM feedback_uses GROUP BY kind, role")}
    taken = sum(n for (kind, _), n in used.items() if kind == "pair")
    held = used.get(("pair", "held_out"), 0)
    quests = ledger.query("SELECT * FROM feedback_quests ORDER BY number DESC LIMIT ?", (recent,))
    return {"enabled": cfg.enabled, "min_pairs": cfg.min_pairs, "min_ratings": cfg.min_ratings,
            "holdout_every": cfg.holdout_every, "new_pairs": new_pairs, "new_ratings": new_ratings,
            "pairs_until_next": pairs_until_next(taken, new_pairs, cfg),
            "ratings_until_next": max(0, cfg.min_ratings - new_ratings), "held_out_pairs": held,
            "quests": quests}


def _records(ledger: Ledger, kind: str, where: str, params: tuple) -> list[dict[str, Any]]:
    rows = ledger.query(f"SELECT p.* FROM preferences p JOIN feedback_uses u ON u.preference_id = p.id "
                        f"WHERE {where} ORDER BY p.id", params)
    out = []
    for r in rows:
        prompt = json.loads(r["prompt"])
        if kind == "pair":
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["chosen"]}],
                        "rejected": [{"role": "assistant", "content": r["rejected"]}]})
        else:
            text = r["chosen"] if r["rating"] > 0 else r["rejected"]
            out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text}],
                        "label": r["rating"] > 0})
    return out


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def quest_records(ledger: Ledger, number: int, kind: str) -> list[dict[str, Any]]:
    """The records Judge quest ``number`` trains (its batch's train rows, oldest first)."""
    return _records(ledger, kind, "u.quest_number=? AND u.role='train'", (number,))


def held_out_records(ledger: Ledger, number: int, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` pairs kept back by Judge quests ``1..number``, oldest first."""
    rows = _records(ledger, "pair", "u.quest_number<=? AND u.role='held_out' AND p.kind='pair'", (number,))
    return rows[-limit:] if limit else []


def claim(ledger: Ledger, cfg: FeedbackConfig) -> dict[str, Any] | None:
    """Mark the unused pairs (else ratings) as Judge quest ``N`` in one transaction, when there are enough
    (see the module doc). Returns the new ``feedback_quests`` row (state ``claimed``), or None."""
    with ledger.transaction() as c:
        for kind in ("pair", "rating"):
            ids = _unused_ids(c, kind)
            taken = _taken(c, kind)
            every = cfg.holdout_every if kind == "pair" else 0
            trains = train_count(taken, len(ids), every)
            if trains < (cfg.min_pairs if kind == "pair" else cfg.min_ratings):
                continue
            number = (c.execute("SELECT MAX(number) FROM feedback_quests").fetchone()[0] or 0) + 1
            roles = ["held_out" if is_held_out(taken + i, every) else "train" for i in range(1, len(ids) + 1)]
            c.executemany("INSERT INTO feedback_uses VALUES (?,?,?,?)",
                          [(pid, kind, number, role) for pid, role in zip(ids, roles, strict=True)])
            row = {"number": number, "kind": kind, "name": quest_name(kind, number), "state": "claimed",
                   "records": trains, "held_out": 0, "content_sha256": "", "created_at": time.time()}
            c.execute("INSERT INTO feedback_quests(number, kind, name, state, records, held_out, content_sha256, "
                      "created_at) VALUES (:number, :kind, :name, :state, :records, :held_out, :content_sha256, "
                      ":created_at)", row)
            return row
    return None


def publish(ledger: Ledger, realm: Realm, cfg: FeedbackConfig, number: int) -> Path:
    """Write claimed Judge quest ``number``: its held-out file, then its quest file into the inbox
    (atomically; not again when the inbox or the ledger has it already), then mark it ``written``.
    Returns the quest file's inbox path. Raises ``OSError`` when a file cannot be written (the quest stays
    claimed and is written at the next try)."""
    row = ledger.query("SELECT * FROM feedback_quests WHERE number=?", (number,))[0]
    held = held_out_records(ledger, number, cfg.max_held_out_pairs)
    held_file = held_out_path(realm, number)
    held_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(held_file, _jsonl(held))
    text = _jsonl(quest_records(ledger, number, row["kind"]))
    path = realm.inbox / cfg.priority / row["name"]
    if not path.exists() and ledger.newest_quest_named(row["name"]) is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    ledger.execute("UPDATE feedback_quests SET state='written', held_out=?, content_sha256=? WHERE number=?",
                   (len(held), hashlib.sha256(text.encode("utf-8")).hexdigest(), number))
    return path


def score(model, tokenizer, path: Path, config: RealmConfig) -> dict[str, float | int]:
    """:func:`core.evaluation.preference_metrics` of a live training ``model`` on the pairs of ``path``.
    The model's training mode, attention implementation and the torch RNG are left as they were."""
    import torch

    from core.evaluation import preference_items, preference_metrics
    from core.packing import PACKED_SDPA

    items = preference_items(path, config, tokenizer, max_examples=config.feedback.max_held_out_pairs)
    was_training, attn = model.training, getattr(model.config, "_attn_implementation", None)
    device = next(model.parameters()).device
    try:
        if attn == PACKED_SDPA:  # packed attention ignores padding masks: score with plain sdpa
            model.set_attn_implementation("sdpa")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return preference_metrics(model, tokenizer, items)
    finally:
        model.train(was_training)
        if attn == PACKED_SDPA:
            model.set_attn_implementation(attn)


def scored_message(row: dict[str, Any]) -> str:
    """The battle-log line of a completed Judge quest."""
    n = row["number"]
    if not row["held_out"]:
        return f"Judge quest #{n}: trained; no held-out pairs to score it yet (feedback.holdout_every)"

    def shown(key: str) -> str:
        v = row.get(key)
        return f"{v:.2f}" if v is not None and math.isfinite(v) else "?"

    return (f"Judge quest #{n}: preference accuracy {shown('accuracy_before')} → {shown('accuracy_after')} on "
            f"{row['held_out']} held-out pairs (mean margin {shown('margin_before')} → {shown('margin_after')} nats)")


class FeedbackLoop:
    """The daemon's side of the loop (see the module doc): :meth:`start` after setup, :meth:`poll` between
    quests and optimizer steps, :meth:`quest_starting` / :meth:`quest_completed` around each quest."""

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger, logger: logging.Logger | None = None,
                 poll_interval_seconds: float = POLL_INTERVAL_SECONDS):
        self.realm, self.config, self.ledger = realm, config, ledger
        self.cfg = config.feedback
        self.log = logger or logging.getLogger("realm.feedback")
        self.poll_interval_seconds = poll_interval_seconds
        self._last_poll = -math.inf

    def start(self) -> None:
        """Write the quests claimed but not written before a crash."""
        for row in self.ledger.query("SELECT number FROM feedback_quests WHERE state='claimed' ORDER BY number"):
            self._publish(row["number"])

    def poll(self) -> Path | None:
        """At most every ``poll_interval_seconds``: claim and write the next Judge quest when enough new
        feedback exists. Returns its path (None: none written). Never raises for a file error (logged)."""
        if not self.cfg.enabled or time.monotonic() - self._last_poll < self.poll_interval_seconds:
            return None
        self._last_poll = time.monotonic()
        status = feedback_status(self.ledger, self.cfg, recent=0)  # reads only: no write lock while nothing is due
        if status["pairs_until_next"] and status["ratings_until_next"]:
            return None
        row = claim(self.ledger, self.cfg)
        return self._publish(row["number"]) if row is not None else None

    def _publish(self, number: int) -> Path | None:
        try:
            path = publish(self.ledger, self.realm, self.cfg, number)
        except OSError as exc:
            self.ledger.event("feedback_quest_failed", f"Judge quest #{number} could not be written ({exc}); "
                              "retried at the next start", level="error", number=number)
            return None
        row = self.ledger.query("SELECT * FROM feedback_quests WHERE number=?", (number,))[0]
        what = "pairs" if row["kind"] == "pair" else "ratings"
        self.ledger.event("feedback_quest", f"Judge quest #{number}: {row['records']} {what} from feedback -> "
                          f"{row['name']} ({row['held_out']} held-out pairs to score it)", number=number,
                          name=row["name"], records=row["records"], held_out=row["held_out"])
        return path

    def _row_of(self, quest: dict[str, Any]) -> dict[str, Any] | None:
        rows = self.ledger.query("SELECT * FROM feedback_quests WHERE name=? AND content_sha256=? AND state='written'",
                                 (quest.get("name"), quest.get("content_hash") or ""))
        return rows[0] if rows else None

    def _score(self, row: dict[str, Any], engine) -> tuple[float | None, float | None]:
        """``(preference accuracy, mean margin)`` of the live weights; Nones without held-out pairs."""
        if not row["held_out"]:
            return None, None
        model = engine.accelerator.unwrap_model(engine.model)
        got = score(model, engine.tokenizer, held_out_path(self.realm, row["number"]), self.config)
        return float(got["preference_accuracy"]), float(got["mean_margin"])

    def quest_starting(self, quest: dict[str, Any], engine) -> None:
        """Score the held-out pairs with the weights a Judge quest starts from (once; not on a resume)."""
        row = self._row_of(quest)
        if row is None or row["quest_id"] is not None:
            return
        with self._reported(row):
            accuracy, margin = self._score(row, engine)
            self.ledger.execute("UPDATE feedback_quests SET quest_id=?, accuracy_before=?, margin_before=?, "
                                "global_step_before=? WHERE number=?",
                                (quest["id"], accuracy, margin, engine.global_step, row["number"]))

    def quest_completed(self, quest: dict[str, Any], engine) -> None:
        """Score the held-out pairs with the end weights of a Judge quest; write the battle-log line."""
        row = self._row_of(quest)
        if row is None or row["accuracy_after"] is not None:
            return
        with self._reported(row):
            accuracy, margin = self._score(row, engine)
            self.ledger.execute("UPDATE feedback_quests SET quest_id=?, accuracy_after=?, margin_after=?, "
                                "global_step_after=? WHERE number=?",
                                (quest["id"], accuracy, margin, engine.global_step, row["number"]))
            row = self.ledger.query("SELECT * FROM feedback_quests WHERE number=?", (row["number"],))[0]
            self.ledger.event("judge_quest_scored", scored_message(row), quest_id=quest["id"],
                              number=row["number"], accuracy_before=row["accuracy_before"],
                              accuracy_after=row["accuracy_after"], margin_before=row["margin_before"],
                              margin_after=row["margin_after"], held_out=row["held_out"],
                              global_step_before=row["global_step_before"], global_step=engine.global_step)

    @contextlib.contextmanager
    def _reported(self, row: dict[str, Any]) -> Iterator[None]:
        """Scoring that raises is a warning event; the daemon goes on."""
        try:
            yield
        except Exception as exc:  # a failing score must not stop training
            self.log.exception("scoring Judge quest #%s failed", row["number"])
            self.ledger.event("judge_quest_score_failed", f"Judge quest #{row['number']}: the held-out pairs "
                              f"could not be scored ({type(exc).__name__}: {exc})", level="warning",
                              number=row["number"])
