"""Read-only JSON API of the battle (blueprint ``api``). Every page rebuilds its state from these.

- ``GET /api/status`` — :func:`tavern.status.build_status` (daemon, hero + game stats, metrics, current
  quest with progress/ETA, queue counts, last checkpoint).
- ``GET /api/history?max_points=N&from_step=A&to_step=B`` — training loss and learning_rate per global step,
  averaged into at most N buckets (default 1500, at most 4096) of ``bucket_steps`` consecutive steps, with
  each bucket's min/max loss; validation loss (``evals``) likewise. Whole history unless a range is given.
  (:meth:`core.ledger.Ledger.history`): exact buckets counted from ``from_step`` for ranges up to 16,384
  steps; longer ranges are read from the ledger's rollups, with ``bucket_steps`` rounded up to a power of two
  and buckets aligned to multiples of it (between N/2 and N points, in bounded time at any history length).
- ``GET /api/events?limit=N`` — the newest N (≤ 500) battle-log events, oldest first;
  ``?since_id=I`` — those after id I.
- ``GET /api/schema`` — ``{"config": JSON Schema of config.json, "quest_record": JSON Schema of one line of
  a quest file, "quest": JSON Schema of a quest as the API returns it}``.
- ``GET /api/glossary`` — the game words and formulas (:mod:`tavern.game`).
"""

from __future__ import annotations

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
# The API's maximum: more points than any chart is wide in pixels. At 10,000 the JSON encoding alone of the
# ~68k numbers took ~90 ms at 10M steps (bench/ledger_history.py), past the 100 ms budget of a zoom.
MAX_HISTORY_POINTS = 4096
MAX_EVENTS = 500


@bp.get("/status")
def status():
    return jsonify(build_status(current_ledger(), current_realm(), current_config()))


@bp.get("/history")
def history():
    max_points = int_arg("max_points", DEFAULT_HISTORY_POINTS, 10, MAX_HISTORY_POINTS)
    ledger = current_ledger()
    bounds = ledger.history_bounds()
    lo = int_arg("from_step", bounds.first_step if bounds.first_step is not None else 0, 0)
    hi = int_arg("to_step", bounds.last_step if bounds.last_step is not None else 0, 0)
    if hi < lo:
        raise BadParameter(f"to_step ({hi}) is below from_step ({lo})")
    h = ledger.history(lo, hi, max_points)  # non-finite values come back as None
    return jsonify(from_step=h.from_step, to_step=h.to_step, bucket_steps=h.bucket_steps,
                   last_global_step=h.last_global_step, train=h.train, eval=h.eval)


@bp.get("/events")
def events():
    limit = int_arg("limit", 100, 1, MAX_EVENTS)
    since_id = int_arg("since_id", None, 0)
    ledger = current_ledger()
    if since_id is not None:
        rows = ledger.events(since_id=since_id, limit=limit)
    else:
        rows = ledger.latest_events(limit)
    return jsonify(events=[event_payload(r) for r in rows])


@bp.get("/schema")
def schema():
    return jsonify(config=config_json_schema(), quest_record=QUEST_RECORD_SCHEMA, quest=QUEST_SCHEMA)


@bp.get("/glossary")
def glossary():
    return jsonify(glossary=game.GLOSSARY, formulas_markdown=game.formula_table_markdown())
