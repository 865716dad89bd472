"""``status`` and the Tavern read the daemon through one contract: same liveness verdict, same ETA."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest

from core.contract import NOT_RUNNING, process_identity
from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue
from tavern.app import close_app, create_app
from tests.conftest import PYTHON, cli, python_env, wait_for, write_text_quest
from training.status import collect_status


def _tavern_daemon(realm) -> dict:
    app = create_app(realm, testing=True)
    try:
        return app.test_client().get("/api/status").get_json()
    finally:
        close_app(app)


def _display_state(realm) -> str | None:
    if not realm.ledger_path.exists():
        return None
    ledger = Ledger(realm.ledger_path)
    try:
        return ledger.daemon_status().display_state
    finally:
        ledger.close()


def _cli_status(realm) -> dict:
    out = cli(realm, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_sigkilled_daemon_is_not_running_at_once_in_status_and_the_tavern(make_realm):
    realm = make_realm()
    proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _display_state(realm) == "idle", what="the daemon idle")
        s = _cli_status(realm)
        assert s["daemon"]["state"] == "idle" and s["daemon"]["alive"] and s["daemon"]["pid"] == proc.pid
        assert _tavern_daemon(realm)["daemon"]["display_state"] == "idle"
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, what="the kill")
        # killed a moment ago, not even reaped: its heartbeat is fresh, its pid is what tells
        s = _cli_status(realm)
        assert s["daemon"]["state"] == NOT_RUNNING and s["daemon"]["reported_state"] == "idle"
        assert not s["daemon"]["alive"] and s["daemon"]["heartbeat_age_seconds"] < 30
        t = _tavern_daemon(realm)["daemon"]
        assert t["display_state"] == NOT_RUNNING and t["alive"] is False
        proc.wait(timeout=30)
        assert collect_status(realm, realm.load_config())["daemon"]["state"] == NOT_RUNNING
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_status_and_the_tavern_give_the_same_eta(make_realm):
    realm = make_realm()
    ledger = Ledger(realm.ledger_path)
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(write_text_quest(realm.inbox / "q.jsonl", 3))
    queue.transition(qid, QuestState.QUEUED, format="text", examples_total=1000)
    queue.transition(qid, QuestState.PROCESSING)
    for s in range(1, 31):  # 4 examples per step
        ledger.record_step(global_step=s, quest_id=qid, loss=2.0, learning_rate=1e-3, grad_norm=1.0, tokens=10,
                           tokens_per_second=10.0, example_start=4 * (s - 1), example_end=4 * s, example_lines=[],
                           quest_steps=s)
    # a daemon that stopped: its published ETA is stale, both compute the one ETA from the steps
    ledger.publish_daemon_status({"state": "stopped", **process_identity(), "eta_seconds": 1.0})
    status_eta = collect_status(realm, realm.load_config())["current_quest"]["eta_seconds"]
    tavern = _tavern_daemon(realm)["quest"]
    rows = ledger.recent_steps(50, quest_id=qid)
    rate = (rows[0]["example_end"] - rows[-1]["example_end"]) / (rows[0]["time"] - rows[-1]["time"])
    assert tavern["examples_per_second"] == pytest.approx(rate)
    assert status_eta == pytest.approx(tavern["eta_seconds"]) == pytest.approx((1000 - 120) / rate)
    # while it trains, both show the daemon's own estimate (computed by the same function)
    ledger.publish_daemon_status({"state": "training", **process_identity(), "quest_id": qid, "eta_seconds": 42.0})
    assert collect_status(realm, realm.load_config())["current_quest"]["eta_seconds"] == 42.0
    assert _tavern_daemon(realm)["quest"]["eta_seconds"] == 42.0
    ledger.close()


def test_status_json_names_each_quests_school(make_realm):
    realm = make_realm(schools={"ipo*.jsonl": {"school": "ipo"}})
    ledger = Ledger(realm.ledger_path)
    queue = QuestQueue(realm, ledger)
    ids = []
    for name, fmt, school in (("a.jsonl", "text", "sft"), ("ipo_b.jsonl", "preference", "ipo"),
                              ("old.jsonl", "text", None)):  # a quest queued before schools: sft
        path = realm.root / name
        path.write_text('{"text": "x"}\n')
        qid = queue.admit(path, "normal")
        queue.transition(qid, QuestState.QUEUED, format=fmt, school=school)
        ids.append(qid)
    ledger.close()
    status = collect_status(realm, realm.load_config())
    quests = {q["id"]: q for q in status["quests"]}
    assert [quests[i]["school"] for i in ids] == ["sft", "ipo", "sft"]
    assert status["schools"] == {}  # none trained a step yet
    ledger = Ledger(realm.ledger_path)
    for step, qid in enumerate(ids, start=1):
        ledger.record_step(global_step=step, quest_id=qid, loss=1.0, learning_rate=1e-3, grad_norm=1.0, tokens=1,
                           tokens_per_second=1.0, example_start=0, example_end=1, example_lines=[1], quest_steps=1)
    ledger.close()
    assert collect_status(realm, realm.load_config())["schools"] == {"sft": {"quests": 2, "steps": 2},
                                                                    "ipo": {"quests": 1, "steps": 1}}
