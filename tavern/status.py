"""``/api/status``: the whole battle state in one JSON object, rebuilt from the ledger on every call.

Sources: the daemon's published status (``Ledger.daemon_status``: state, hero, heartbeat, and the one
liveness rule of :mod:`core.contract`), the latest ``steps`` rows, the latest ``evals`` row, the current
quest row, queue counts, the skill levels (``trials``: ``hero.skill_levels``, ``hero.total_level``), the
Temple's blessing (``hero.blessing``, :mod:`tavern.blessing`). Game
stats come from :mod:`tavern.game` only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from core.checkpoint_layout import latest_checkpoint as latest_checkpoint_path
from core.checkpoint_layout import step_of
from core.config import RealmConfig
from core.contract import ETA_WINDOW_STEPS, DaemonState, quest_eta
from core.ledger import Ledger, QuestState
from core.realm import Realm
from tavern import game
from tavern.blessing import hero_blessing


def daemon_view(ledger: Ledger, now: float) -> dict[str, Any]:
    """The daemon's kv plus ``display_state`` ("not running" / "not responding" / its state: the liveness
    rule of :func:`core.contract.read_daemon_status`), ``heartbeat_age_seconds`` and ``alive``."""
    d = ledger.daemon_status(now)
    return {"state": d.state, "display_state": d.display_state, "pid": d.pid,
            "heartbeat_age_seconds": d.heartbeat_age_seconds, "alive": d.alive, "kv": d.value}


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
    estimate = quest_eta(ledger.recent_steps(ETA_WINDOW_STEPS, quest_id=quest["id"]), total, done)
    rate = estimate.examples_per_second
    eta = eta_from_daemon if eta_from_daemon is not None else estimate.eta_seconds
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
    recent = ledger.recent_steps(game.ATK_LOSS_WINDOW_STEPS)[::-1]
    last = recent[-1] if recent else {}
    last_eval = ledger.latest_eval() or {}
    global_step = max(int(last.get("global_step") or 0), int(kv.get("global_step") or 0))
    losses = [r["loss"] for r in recent]
    stats = game.hero_stats(global_step, losses, last_eval.get("eval_loss"), last.get("grad_norm"),
                            config.training.max_grad_norm)
    hero_kv = kv.get("hero") if isinstance(kv.get("hero"), dict) else {}
    hero_name = hero_kv.get("name") or config.hero.name
    hero = {"name": hero_name, "base_model": hero_kv.get("base_model", config.hero.base_model),
            "architecture": hero_kv.get("architecture"), "parameters": hero_kv.get("parameters"),
            "newborn": hero_kv.get("newborn", config.hero.base_model is None), **stats.to_dict()}
    skill_levels = {name: info["level"] for name, info in ledger.skill_summary(hero_name).items()}
    hero.update(skill_levels=skill_levels, total_level=game.total_level(skill_levels),
                blessing=hero_blessing(ledger, hero_name, global_step).to_dict())
    finite = [x for x in losses if x is not None and math.isfinite(x)]
    training = daemon["display_state"] == DaemonState.TRAINING.value  # alive and training: its figures are fresh
    tokens_per_second = kv.get("tokens_per_second") if training else None
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
    eta = kv.get("eta_seconds") if training else None
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
