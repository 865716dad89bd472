"""The hero loop in a real in-process daemon (nano hero, real files, real SQLite): generated quests appear
only when idle, stay under the cap, train and get trialled; user quests go first; ``--until-idle`` never
generates."""

from __future__ import annotations

import json
import re

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from core.skills.loop import GENERATED_GLOB, is_generated
from tests.conftest import write_text_quest
from tests.core.test_daemon import DaemonThread

LOOP = {"idle_generation": {"enabled": True, "examples_per_quest": 60, "max_pending_quests": 1},
        "skills": {"priorities": {"BIN": 1.0}, "trial_every_steps": 4, "trial_samples": 30}}


def _generated(quests):
    return [q for q in quests if is_generated(q)]


def test_idle_daemon_generates_trains_and_tries_under_the_cap(make_realm):
    realm = make_realm(**LOOP)
    with DaemonThread(realm) as d:
        seen_pending = []

        def progressed():
            waiting = [q for q in _generated(d.quests()) if q["state"] in ("validating", "queued", "processing")]
            files = list(realm.inbox.rglob(GENERATED_GLOB))
            seen_pending.append(len(waiting) + len(files))
            done = [q for q in _generated(d.quests()) if q["state"] == "completed"]
            return len(done) >= 2 and d.ledger.trials(realm.load_config().hero.name)

        d.wait_for(progressed, timeout=180, what="two generated quests trained and a trial")
    assert max(seen_pending) <= 1  # never more than max_pending_quests waiting
    ledger = Ledger(realm.ledger_path)
    quests = ledger.list_quests()
    assert all(re.fullmatch(r"skill-BIN-L\d+-idle\d{6}\.jsonl", q["name"]) for q in quests)
    assert {q["priority"] for q in quests} == {"low"} and {q["format"] for q in quests} == {"prompt_completion"}
    trial = ledger.trials(realm.load_config().hero.name)[0]
    assert trial.skill == "BIN" and trial.n == 30 and trial.level == 0 and trial.checkpoint.startswith("step-")
    assert trial.global_step >= 4 and (realm.root / "models").exists()
    kinds = [e["kind"] for e in ledger.events()]
    assert "quest_generated" in kinds and "trial" in kinds
    ledger.close()


def test_a_user_quest_dropped_meanwhile_trains_at_the_next_boundary(make_realm):
    realm = make_realm(**{**LOOP, "idle_generation": {**LOOP["idle_generation"], "examples_per_quest": 400}})
    with DaemonThread(realm) as d:
        d.wait_for(lambda: any(q["state"] == "processing" for q in _generated(d.quests())), timeout=120,
                   what="a generated quest training")
        training = next(q for q in _generated(d.quests()) if q["state"] == "processing")
        write_text_quest(realm.inbox / "low" / "mine.jsonl", 12)
        d.wait_for(lambda: any(q["name"] == "mine.jsonl" and q["state"] == "completed" for q in d.quests()),
                   timeout=180, what="the user quest trained")
        quests = {q["name"]: q for q in d.quests()}
    mine, before = quests["mine.jsonl"], quests[training["name"]]
    assert before["state"] == "completed" and mine["first_global_step"] == before["last_global_step"] + 1
    later = [q for q in _generated(quests.values()) if q["id"] > before["id"]]
    assert all(q["first_global_step"] is None or q["first_global_step"] > mine["last_global_step"] for q in later)


def test_generated_quests_train_after_user_quests_and_until_idle_generates_none(make_realm):
    realm = make_realm(**LOOP)
    high = realm.inbox / "high" / "skill-BIN-L0-idle000099.jsonl"
    high.parent.mkdir(parents=True, exist_ok=True)
    high.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i % 2}+1"}],
                                        "completion": [{"role": "assistant", "content": str(i)}]}) + "\n"
                            for i in range(8)))
    write_text_quest(realm.inbox / "low" / "mine.jsonl", 8)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    quests = {q["name"]: q for q in ledger.list_quests()}
    ledger.close()
    assert set(quests) == {high.name, "mine.jsonl"}  # nothing generated with --until-idle
    assert quests["mine.jsonl"]["last_global_step"] < quests[high.name]["first_global_step"]  # user first


@pytest.mark.slow
def test_trials_between_steps_leave_training_exactly_as_without_them(make_realm):
    from core.skills.binary import BinarySkill
    from core.skills.quests import mixed_items, quest_record, write_quest

    items = mixed_items(BinarySkill(), [0, 1, 2], 120, "exact")
    losses = {}
    for every in (0, 2):
        realm = make_realm(f"every{every}", skills={"trial_every_steps": every, "trial_samples": 30})
        write_quest(realm.inbox / "skill-BIN-L0-1-2-exact.jsonl", (quest_record(it) for it in items))
        assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
        ledger = Ledger(realm.ledger_path)
        losses[every] = [(r["global_step"], r["loss"], r["grad_norm"]) for r in ledger.steps()]
        trials = ledger.trials(realm.load_config().hero.name)
        ledger.close()
        assert (len(trials) >= 2) == (every == 2)  # tried at checkpoints (save_steps 5) only with a schedule
    assert len(losses[0]) >= 6 and losses[2] == losses[0]  # bit-identical: trials never perturb training
