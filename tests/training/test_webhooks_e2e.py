"""Webhooks from real processes to a real local receiver: a daemon run whose receiver is down for a while
(events buffered in the ledger, then delivered in order, each once, signed), and the supervisor delivering
the crash of its SIGKILLed daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from core.ledger import Ledger
from core.webhooks import EVENT_KINDS, SIGNATURE_HEADER, verify
from safety.processes import alive, read_pid
from tests.conftest import PYTHON, cli, python_env, wait_for, write_text_quest
from tests.local_http import Receiver

pytestmark = pytest.mark.slow
SECRET = "webhook-test-secret"
KINDS = {kind for kinds in EVENT_KINDS.values() for kind in kinds}


def add_webhook(realm, url: str, **extra) -> None:
    data = json.loads(realm.config_path.read_text())
    data["webhooks"] = [{"url": url, "secret": SECRET, **extra}]
    realm.config_path.write_text(json.dumps(data))


def subscribed_events(realm) -> list[dict]:
    ledger = Ledger(realm.ledger_path)
    try:
        return [e for e in ledger.events(limit=100_000) if e["kind"] in KINDS]
    finally:
        ledger.close()


def test_a_daemon_run_reaches_a_receiver_that_was_down(make_realm, tmp_path):
    realm = make_realm(training={"save_steps": 20, "micro_batch_size": 1})  # one example per step
    receiver = Receiver()  # its port is reserved; nothing listens yet
    add_webhook(realm, receiver.url, backoff_max_seconds=2)  # retries every 2 s at most, to keep the test short
    log = open(tmp_path / "daemon.log", "w")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"],
                              stdout=log, stderr=subprocess.STDOUT, env=python_env())
    try:
        ledger = Ledger(realm.ledger_path)
        wait_for(lambda: (ledger.get_value("daemon") or {}).get("state") == "idle", timeout=120, what="daemon idle")
        write_text_quest(realm.inbox / "quest.jsonl", 56)  # 56 global steps: level 2 at 50
        (realm.inbox / "broken.jsonl").write_text("not json\n" * 5)  # rejected: a quest_failed webhook
        wait_for(lambda: any(q["state"] == "completed" for q in ledger.list_quests()), timeout=240,
                 what="quest completed")
        wait_for(lambda: any(r["error"] and "cannot connect" in r["error"] for r in ledger.webhook_deliveries()),
                 timeout=30, what="a failed delivery while the receiver is down")
        assert receiver.snapshot() == []
        receiver.start()  # back up: the buffered events go out
        # the events so far, and any the daemon adds meanwhile (a quest-end checkpoint may follow "completed")
        wait_for(lambda: [json.loads(r["body"])["event_id"] for r in receiver.snapshot()]
                 == [e["id"] for e in subscribed_events(realm)],
                 timeout=90, what="all buffered events delivered")
        ledger.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        log.close()
        receiver.stop()
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    events = subscribed_events(realm)
    got = receiver.snapshot()
    bodies = [json.loads(r["body"]) for r in got]
    assert [b["event_id"] for b in bodies] == [e["id"] for e in events]  # in order, each once, none missing
    assert all(verify(SECRET, r["body"], r["headers"][SIGNATURE_HEADER.lower()]) for r in got)
    names = [b["event"] for b in bodies]
    assert {"quest_completed", "checkpoint_saved", "level_up", "quest_failed"} <= set(names), names
    level_up = next(b for b in bodies if b["event"] == "level_up")
    assert level_up["data"]["new_level"] == 2 and level_up["data"]["global_step"] >= 50
    ledger = Ledger(realm.ledger_path)
    try:
        rows = ledger.webhook_deliveries(limit=1000)
    finally:
        ledger.close()
    assert all(r["state"] == "delivered" for r in rows) and rows[0]["attempts"] >= 2
    assert len({r["event_id"] for r in rows}) == len(rows) == len(events)


def test_the_supervisor_delivers_the_crash_of_its_daemon(make_realm):
    realm = make_realm()
    receiver = Receiver().start()
    add_webhook(realm, receiver.url, events=["crash"])
    try:
        assert cli(realm, "start-all", "--no-tavern").returncode == 0
        daemon = wait_for(lambda: (p := read_pid(realm, "daemon")) and alive(p) and p, timeout=60, what="daemon")
        os.kill(daemon, signal.SIGKILL)  # the daemon is dead: only the supervisor can deliver its crash
        got = wait_for(receiver.snapshot, timeout=60, what="crash webhook")
    finally:
        cli(realm, "stop-all", "--timeout", "60")
        receiver.stop()
    body = json.loads(got[0]["body"])
    assert body["event"] == "crash" and body["data"]["process"] == "daemon" and body["data"]["pid"] == daemon
    assert body["data"]["crash_class"] == "signal"
    assert verify(SECRET, got[0]["body"], got[0]["headers"][SIGNATURE_HEADER.lower()])
