"""Read-only JSON API of the battle (blueprint ``api``). Every page rebuilds its state from these.

- ``GET /api/status`` — :func:`tavern.status.build_status` (daemon, hero + game stats, metrics, current
  quest with progress/ETA, queue counts, last checkpoint).
- ``GET /api/history?max_points=N&from_step=A&to_step=B`` — training loss and learning_rate per global step,
  averaged into at most N buckets (default 1500, at most 10000) of ``bucket_steps`` consecutive steps, with
  each bucket's min/max loss; validation loss (``evals``) likewise. Whole history unless a range is given.
- ``GET /api/events?limit=N`` — the newest N (≤ 500) battle-log events, oldest first;
  ``?since_id=I`` — those after id I.
- ``GET /api/schema`` — ``{"config": JSON Schema of config.json, "quest_record": JSON Schema of one line of
  a quest file, "quest": JSON Schema of a quest as the API returns it}``.
- ``GET /api/glossary`` — the game words and formulas (:mod:`tavern.game`).
"""

from __future__ import annotations

import math

from flask import Blueprint, jsonify

from core.config import config_json_schema
from tavern import game
from tavern.context import current_config, current_ledger, current_realm
from tavern.params import BadParameter, int_arg
from tavern.push import event_payload
from tavern.schemas import QUEST_RECORD_SCHEMA, QUEST_SCHEMA
from tavern.status import build_status

bp = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_HISTORY_POINTS = 1500
MAX_HISTORY_POINTS = 10000
MAX_EVENTS = 500


@bp.get("/status")
def status():
    return jsonify(build_status(current_ledger(), current_realm(), current_config()))


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def downsample(table: str, value_sql: str, lo: int, hi: int, max_points: int) -> tuple[int, list[dict]]:
    """Average rows of ``table`` with ``lo <= global_step <= hi`` into buckets of consecutive steps.

    Returns ``(bucket_steps, rows)``; each row has ``global_step`` (mean step of the bucket) and the
    columns of ``value_sql``.
    """
    span = max(1, hi - lo + 1)
    bucket = max(1, math.ceil(span / max_points))
    rows = current_ledger().query(
        f"SELECT AVG(global_step) AS global_step, {value_sql} FROM {table} "
        "WHERE global_step BETWEEN ? AND ? GROUP BY (global_step - ?) / ? ORDER BY 1",
        (lo, hi, lo, bucket))
    return bucket, rows


@bp.get("/history")
def history():
    max_points = int_arg("max_points", DEFAULT_HISTORY_POINTS, 10, MAX_HISTORY_POINTS)
    ledger = current_ledger()
    bounds = ledger.query("SELECT MIN(global_step) AS lo, MAX(global_step) AS hi FROM steps")[0]
    ebounds = ledger.query("SELECT MIN(global_step) AS lo, MAX(global_step) AS hi FROM evals")[0]
    los = [b for b in (bounds["lo"], ebounds["lo"]) if b is not None]
    his = [b for b in (bounds["hi"], ebounds["hi"]) if b is not None]
    lo = int_arg("from_step", min(los) if los else 0, 0)
    hi = int_arg("to_step", max(his) if his else 0, 0)
    if hi < lo:
        raise BadParameter(f"to_step ({hi}) is below from_step ({lo})")
    bucket, train = downsample("steps", "AVG(loss) AS loss, MIN(loss) AS loss_min, MAX(loss) AS loss_max, "
                               "AVG(learning_rate) AS learning_rate", lo, hi, max_points)
    _, evals = downsample("evals", "AVG(eval_loss) AS eval_loss", lo, hi, max_points)
    cols = ("global_step", "loss", "loss_min", "loss_max", "learning_rate")
    return jsonify(
        from_step=lo, to_step=hi, bucket_steps=bucket, last_global_step=bounds["hi"],
        train={c: [_num(r[c]) for r in train] for c in cols},
        eval={c: [_num(r[c]) for r in evals] for c in ("global_step", "eval_loss")},
    )


@bp.get("/events")
def events():
    limit = int_arg("limit", 100, 1, MAX_EVENTS)
    since_id = int_arg("since_id", None, 0)
    ledger = current_ledger()
    if since_id is not None:
        rows = ledger.events(since_id=since_id, limit=limit)
    else:
        rows = ledger.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))[::-1]
    return jsonify(events=[event_payload(r) for r in rows])


@bp.get("/schema")
def schema():
    return jsonify(config=config_json_schema(), quest_record=QUEST_RECORD_SCHEMA, quest=QUEST_SCHEMA)


@bp.get("/glossary")
def glossary():
    return jsonify(glossary=game.GLOSSARY, formulas_markdown=game.formula_table_markdown())
