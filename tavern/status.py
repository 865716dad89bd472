"""``/api/status``: the whole battle state in one JSON object, rebuilt from the ledger on every call.

Sources: the ``daemon`` kv (state, hero, heartbeat = its ``updated_at``), the latest ``steps`` rows, the
latest ``evals`` row, the current quest row, queue counts. Game stats come from :mod:`tavern.game` only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psutil

from core.checkpoint_layout import latest_checkpoint as latest_checkpoint_path
from core.checkpoint_layout import step_of
from core.config import RealmConfig
from core.ledger import Ledger, QuestState
from core.realm import Realm
from tavern import game

HEARTBEAT_STALE_SECONDS = 30.0  # a daemon whose heartbeat is older is shown as "not responding"
ETA_WINDOW_STEPS = 50  # steps of the current quest used to estimate examples/second


def daemon_view(ledger: Ledger, now: float) -> dict[str, Any]:
    """The daemon's kv plus ``display_state`` ("not running" / "not responding" / its state),
    ``heartbeat_age_seconds`` and ``alive``."""
    value, updated_at = ledger.get_value_with_time("daemon")
    value = value if isinstance(value, dict) else {}
    state = value.get("state")
    age = None if updated_at is None else max(0.0, now - updated_at)
    pid = value.get("pid")
    if not value:
        display = "not running"
    elif state == "stopped":
        display = "stopped"
    elif isinstance(pid, int) and pid > 0 and not psutil.pid_exists(pid):
        display = "not running"
    elif age is not None and age > HEARTBEAT_STALE_SECONDS:
        display = "not responding"
    else:
        display = state or "unknown"
    return {"state": state, "display_state": display, "pid": pid, "heartbeat_age_seconds": age,
            "alive": display not in ("not running", "not responding", "stopped"), "kv": value}


def current_quest(ledger: Ledger, daemon_kv: dict[str, Any], eta_from_daemon: float | None) -> dict | None:
    """The quest being trained (daemon's ``quest_id``, else the first ``processing`` one) with
    ``progress`` (0..1 of examples), ``examples_per_second`` and ``eta_seconds``."""
    quest = None
    if daemon_kv.get("quest_id") is not None:
        quest = ledger.get_quest(int(daemon_kv["quest_id"]))
    if quest is None:
        rows = ledger.list_quests([QuestState.PROCESSING], limit=1)
        quest = rows[0] if rows else None
    if quest is None:
        return None
    total, done = quest.get("examples_total"), quest.get("examples_trained") or 0
    rows = ledger.query("SELECT time, example_end FROM steps WHERE quest_id=? ORDER BY global_step DESC "
                        "LIMIT ?", (quest["id"], ETA_WINDOW_STEPS))
    rate = None
    if len(rows) >= 2 and rows[0]["time"] > rows[-1]["time"] and rows[0]["example_end"] is not None:
        rate = (rows[0]["example_end"] - (rows[-1]["example_end"] or 0)) / (rows[0]["time"] - rows[-1]["time"])
    eta = eta_from_daemon
    if eta is None and rate and rate > 0 and total:
        eta = max(0, total - done) / rate
    keep = ("id", "name", "state", "priority", "format", "attempts", "examples_total", "examples_trained",
            "steps", "first_global_step", "last_global_step", "started_at")
    out = {k: quest.get(k) for k in keep}
    out.update(progress=(min(1.0, done / total) if total else None), examples_per_second=rate,
               eta_seconds=eta)
    return out


def latest_checkpoint(realm: Realm, hero_name: str) -> dict | None:
    """The hero's latest checkpoint (:func:`core.checkpoint_layout.latest_checkpoint`) as
    :func:`checkpoint_view` shows it, or None."""
    path = latest_checkpoint_path(realm.checkpoints_dir(hero_name))
    return None if path is None else checkpoint_view(realm, path)


def checkpoint_view(realm: Realm, path: Path) -> dict[str, Any]:
    """``{"global_step", "name", "path"}`` of the checkpoint folder ``path`` (``path`` relative to the realm:
    clients need names, not the server's folders)."""
    return {"global_step": step_of(path), "name": path.name, "path": str(path.relative_to(realm.root))}


def build_status(ledger: Ledger, realm: Realm, config: RealmConfig, now: float | None = None) -> dict:
    """The JSON of ``/api/status`` (and of the ``status`` Socket.IO event). Units: seconds, tokens/s."""
    now = time.time() if now is None else now
    daemon = daemon_view(ledger, now)
    kv = daemon.pop("kv")
    recent = ledger.query("SELECT global_step, loss, learning_rate, grad_norm, tokens_per_second FROM steps "
                          "ORDER BY global_step DESC LIMIT ?", (game.ATK_LOSS_WINDOW_STEPS,))[::-1]
    last = recent[-1] if recent else {}
    evals = ledger.query("SELECT global_step, eval_loss FROM evals ORDER BY global_step DESC, time DESC "
                         "LIMIT 1")
    last_eval = evals[0] if evals else {}
    global_step = max(int(last.get("global_step") or 0), int(kv.get("global_step") or 0))
    losses = [r["loss"] for r in recent]
    stats = game.hero_stats(global_step, losses, last_eval.get("eval_loss"), last.get("grad_norm"),
                            config.training.max_grad_norm)
    hero_kv = kv.get("hero") if isinstance(kv.get("hero"), dict) else {}
    hero_name = hero_kv.get("name") or config.hero.name
    hero = {"name": hero_name, "base_model": hero_kv.get("base_model", config.hero.base_model),
            "architecture": hero_kv.get("architecture"), "parameters": hero_kv.get("parameters"),
            "newborn": hero_kv.get("newborn", config.hero.base_model is None), **stats.to_dict()}
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    tokens_per_second = kv.get("tokens_per_second") if daemon["state"] == "training" else None
    metrics = {
        "global_step": global_step,
        "loss": last.get("loss"),
        "loss_window_mean": sum(finite) / len(finite) if finite else None,
        "loss_window_steps": len(finite),
        "eval_loss": last_eval.get("eval_loss"),
        "eval_global_step": last_eval.get("global_step"),
        "learning_rate": last.get("learning_rate"),
        "grad_norm": last.get("grad_norm"),
        "tokens_per_second": tokens_per_second if tokens_per_second is not None
        else last.get("tokens_per_second"),
    }
    eta = kv.get("eta_seconds") if daemon["state"] == "training" else None
    return {
        "time": now,
        "daemon": daemon,
        "hero": hero,
        "metrics": {k: _finite(v) for k, v in metrics.items()},
        "quest": current_quest(ledger, kv, eta),
        "queue": ledger.queue_counts(),
        "last_checkpoint": kv.get("last_checkpoint") or latest_checkpoint(realm, hero_name),
    }


def _finite(x):
    """None for NaN/±inf (JSON has neither); anything else unchanged."""
    return None if isinstance(x, float) and not math.isfinite(x) else x
