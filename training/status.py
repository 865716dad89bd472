"""``python -m training status [--json]``: the hero, global step, current quest, queue, last checkpoint.

Read-only: everything comes from the ledger, the checkpoints folder and the pid files (no torch import).
"""

from __future__ import annotations

import json
import time
from typing import Any

from core.campaigns import campaign_status
from core.checkpoint_layout import latest_checkpoint, step_of
from core.config import RealmConfig
from core.contract import ETA_WINDOW_STEPS, DaemonState, DaemonStatus, quest_eta, read_daemon_status
from core.feedback import feedback_status
from core.ledger import Ledger, QuestState
from core.realm import Realm
from safety.crash import recent_crashes
from training.processes import ROLES, SUPERVISOR, process_info


def _last_checkpoint(realm: Realm, hero: str) -> dict[str, Any] | None:
    path = latest_checkpoint(realm.checkpoints_dir(hero))
    return None if path is None else {"step": step_of(path), "path": str(path)}


def collect_status(realm: Realm, config: RealmConfig) -> dict[str, Any]:
    """Status as a JSON-able dict (the ``status --json`` contract)."""
    out: dict[str, Any] = {"realm": str(realm.root), "global_step": 0,
                           "hero": {"name": config.hero.name, "base_model": config.hero.base_model,
                                    "parameters": None, "architecture": None, "newborn": None,
                                    "adapter": config.training.adapter, "trainable_parameters": None},
                           "daemon": _daemon(read_daemon_status(None, None)),
                           "processes": {}, "queue": {s.value: 0 for s in QuestState}, "quests": [],
                           "current_quest": None, "last_checkpoint": _last_checkpoint(realm, config.hero.name),
                           "supervisor": None, "crashes": [], "last_crash": None,
                           "schools": {}, "skills": skills_status(config, None), "skill_errors": [],
                           "campaign": campaign_status(config.campaign, None), "feedback": None}
    for role in (*ROLES, SUPERVISOR):
        info = process_info(realm, role)
        out["processes"][role] = {"state": info.state.value, "pid": info.pid}
    if not realm.ledger_path.exists():
        return out
    ledger = Ledger(realm.ledger_path)
    try:
        daemon = ledger.daemon_status()
        out["daemon"] = _daemon(daemon)
        if isinstance(daemon.get("hero"), dict):
            out["hero"].update(daemon.get("hero"))
        supervisor = ledger.supervisor_status()
        if isinstance(supervisor, dict):
            running = out["processes"][SUPERVISOR]["state"] == "running"
            out["supervisor"] = {**supervisor, "state": supervisor.get("state") if running else "stopped"}
        out["crashes"] = recent_crashes(ledger, limit=10)
        out["last_crash"] = out["crashes"][0] if out["crashes"] else None
        last = ledger.last_step()
        out["global_step"] = max(last["global_step"] if last else 0,
                                 (out["last_checkpoint"] or {}).get("step", 0))
        out["queue"] = ledger.queue_counts()
        quests = ledger.list_quests(limit=100000)
        out["quests"] = [{
            "id": q["id"], "name": q["name"], "state": q["state"], "priority": q["priority"],
            "format": q["format"], "school": q.get("school") or ("sft" if q["format"] else None),
            "examples_total": q["examples_total"],
            "examples_trained": q["examples_trained"], "steps": q["steps"], "attempts": q["attempts"],
            "note": q["note"], "error": q["error"],
        } for q in quests]
        out["schools"] = ledger.school_step_counts()  # {school: {"quests", "steps"}} of quests that trained
        out["skills"] = skills_status(config, ledger)
        out["skill_errors"] = ledger.skill_load_errors()
        out["campaign"] = campaign_status(config.campaign, ledger)
        out["feedback"] = feedback_status(ledger, config.feedback, recent=1)  # the feedback loop (core.feedback)
        current = [q for q in quests if q["state"] == QuestState.PROCESSING.value]
        if current:
            q = current[0]
            eta = daemon.get("eta_seconds") if daemon.display_state == DaemonState.TRAINING.value else \
                quest_eta(ledger.recent_steps(ETA_WINDOW_STEPS, quest_id=q["id"]), q["examples_total"],
                          q["examples_trained"]).eta_seconds
            out["current_quest"] = {"id": q["id"], "name": q["name"], "examples_trained": q["examples_trained"],
                                    "examples_total": q["examples_total"], "eta_seconds": eta}
    finally:
        ledger.close()
    return out


def _daemon(d: DaemonStatus) -> dict[str, Any]:
    """The ``daemon`` object of ``status --json``: what the daemon published (but its hero), with ``state``
    = the liveness verdict of :func:`core.contract.read_daemon_status` (the Tavern shows the same), the
    state it published as ``reported_state``, ``alive`` and ``heartbeat_age_seconds``."""
    return {**{k: v for k, v in d.value.items() if k != "hero"}, "state": d.display_state,
            "reported_state": d.state, "alive": d.alive, "pid": d.pid,
            "heartbeat_age_seconds": d.heartbeat_age_seconds}


def skills_status(config: RealmConfig, ledger: Ledger | None) -> list[dict[str, Any]]:
    """``status --json`` ``skills``: the skills of ``skills.priorities`` and any other skill with a trial,
    each ``{"name", "level", "trials", "priority", "last_trial": {"level", "n", "correct", "accuracy",
    "lower_bound", "step"} | None}`` (levels and trials from the ledger's ``trials`` table)."""
    summary = ledger.skill_summary(config.hero.name) if ledger is not None else {}
    names = list(config.skills.priorities) + [n for n in summary if n not in config.skills.priorities]
    out = []
    for name in names:
        info = summary.get(name) or {}
        last = info.get("last_trial")
        out.append({"name": name, "level": info.get("level", 0), "trials": info.get("trials", 0),
                    "priority": config.skills.priorities.get(name, 0.0),
                    "last_trial": None if last is None else {
                        "level": last.level, "n": last.n, "correct": last.correct, "accuracy": last.accuracy,
                        "lower_bound": last.lower_bound, "step": last.global_step}})
    return out


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = min(1.0, done / total) if total else 0.0
    return "[" + "#" * int(frac * width) + "-" * (width - int(frac * width)) + f"] {100 * frac:5.1f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def format_status(s: dict[str, Any]) -> str:
    """Human-readable status for the terminal."""
    hero = s["hero"]
    params = f"{hero['parameters']:,} parameters" if hero.get("parameters") else "parameters unknown"
    if hero.get("adapter"):
        trainable = hero.get("trainable_parameters")
        params += f", {hero['adapter']} adapter" + (f" with {trainable:,} trainable" if trainable else "")
    lines = [f"realm:        {s['realm']}",
             f"hero:         {hero['name']} ({hero.get('architecture') or '?'}, {params})",
             f"base model:   {hero.get('base_model') or 'embedded default (newborn, random init)'}"]
    if hero.get("newborn"):
        lines.append("              a newborn hero: set hero.base_model in config.json to train a real model")
    d = s["daemon"]
    age = d.get("heartbeat_age_seconds")
    lines.append(f"daemon:       {d.get('state')} (pid {d.get('pid')}, heartbeat {age:.0f} s ago)"
                 if age is not None else f"daemon:       {d.get('state')}")
    tavern = s["processes"].get("tavern", {})
    lines.append(f"tavern:       {tavern.get('state')}")
    sup = s.get("supervisor")
    if sup and sup.get("state") != "stopped":
        kids = ", ".join(f"{role} {c.get('state')}" + (f" ({c['restarts_in_window']} restarts)"
                                                       if c.get("restarts_in_window") else "")
                         for role, c in (sup.get("children") or {}).items())
        lines.append(f"supervisor:   {sup.get('state')} (pid {sup.get('pid')}): {kids}")
    else:
        lines.append("supervisor:   not running")
    lines.append(f"global step:  {s['global_step']}")
    if d.get("alive") and d.get("tokens_per_second"):
        lines.append(f"tokens/s:     {d['tokens_per_second']:.0f}")
    q = s["current_quest"]
    if q:
        lines.append(f"quest:        #{q['id']} {q['name']}")
        lines.append(f"              {_bar(q['examples_trained'] or 0, q['examples_total'] or 0)} "
                     f"{q['examples_trained']}/{q['examples_total']} examples, ETA {_duration(q['eta_seconds'])}")
    else:
        lines.append("quest:        none training")
    counts = s["queue"]
    lines.append("queue:        " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    waiting = [x for x in s["quests"] if x["state"] == "queued" and x["note"]]
    for x in waiting:
        lines.append(f"              #{x['id']} {x['name']}: {x['note']}")
    crash = s.get("last_crash")
    if crash:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(crash.get("time")))
        lines.append(f"last crash:   {when} {crash.get('process')} {crash.get('crash_class')}: "
                     f"{crash.get('summary')} ({len(s.get('crashes') or [])} recent)")
    ck = s["last_checkpoint"]
    lines.append(f"checkpoint:   {ck['path']}" if ck else "checkpoint:   none yet")
    for i, sk in enumerate(s.get("skills") or []):
        last = sk["last_trial"]
        tried = (f"last trial level {last['level']}: {last['correct']}/{last['n']}, lower bound "
                 f"{last['lower_bound']:.3f}, step {last['step']}" if last else "no trial yet")
        lines.append(f"{'skills:' if i == 0 else '':14}{sk['name']} level {sk['level']} ({sk['trials']} trials; {tried})")
    for e in s.get("skill_errors") or []:
        lines.append(f"skill error:  {e['source']}: {e['message'].strip().splitlines()[-1][:120]}")
    c = s.get("campaign")
    if c:
        lines.append("campaign:     finished (" + f"{c['stages']} stages)" if c["finished"] else
                     f"campaign:     stage {c['stage']} of {c['stages']}: {c['name']} ({c['school']}; until "
                     + ", ".join(f"{k} {v}" for k, v in (c["until"] or {}).items()) + ")")
    f = s.get("feedback")
    if f:
        lines.append(_feedback_line(f))
    return "\n".join(lines)


def _feedback_line(f: dict[str, Any]) -> str:
    if not f["enabled"]:
        return "feedback:     off (feedback.enabled): ratings and pairs are only stored"
    line = (f"feedback:     {f['pairs_until_next']} pairs until the next Judge quest, {f['ratings_until_next']} "
            f"ratings until a KTO one")
    last = f["quests"][0] if f["quests"] else None
    if last and last["accuracy_after"] is not None:
        line += (f"; Judge quest #{last['number']}: preference accuracy "
                 + " → ".join("?" if v is None else f"{v:.2f}" for v in (last["accuracy_before"], last["accuracy_after"])))
    return line


def status_json(realm: Realm, config: RealmConfig) -> str:
    return json.dumps(collect_status(realm, config), indent=2)
