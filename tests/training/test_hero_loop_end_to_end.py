"""The newborn hero comes alive, short version (a real ``daemon`` process, nothing dropped in): the embedded
nano hero with BIN in ``skills.priorities`` generates its own quests, trains them, and the trial loop tries
BIN on a checkpoint; SIGTERM stops it warmly. The 10-minute measurement (micro hero, BIN levels) is in the
README's Idle generation section."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from core.ledger import Ledger, QuestState
from core.skills.loop import is_generated
from tests.conftest import PYTHON, cli, python_env, wait_for

pytestmark = pytest.mark.slow


def test_a_fresh_realm_trains_generated_quests_and_records_a_trial(make_realm):
    realm = make_realm(idle_generation={"enabled": True, "examples_per_quest": 200},
                       skills={"priorities": {"BIN": 1.0}, "trial_every_steps": 10})
    assert not any(realm.inbox.rglob("*.jsonl"))
    with open(realm.root / "daemon.log", "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"], env=python_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    ledger = None
    try:
        def tried():
            nonlocal ledger
            if ledger is None and realm.ledger_path.exists():
                ledger = Ledger(realm.ledger_path)
            return ledger is not None and ledger.trials(realm.load_config().hero.name) and any(
                is_generated(q) for q in ledger.list_quests([QuestState.COMPLETED]))

        wait_for(tried, timeout=150, what="a generated quest trained and a trial of BIN by the daemon's loop")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        if ledger is not None:
            ledger.close()
    assert rc == 0, (realm.root / "daemon.log").read_text()[-3000:]
    status = json.loads(cli(realm, "status", "--json").stdout)
    trained = [q for q in status["quests"] if is_generated(q) and q["state"] == "completed"]
    assert trained, status["quests"]
    bin_skill = next(s for s in status["skills"] if s["name"] == "BIN")
    assert bin_skill["trials"] >= 1 and bin_skill["last_trial"]["n"] == 50
    assert bin_skill["last_trial"]["step"] >= 10
