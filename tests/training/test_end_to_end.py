"""Real processes: start-all / status / stop-all, and SIGKILL mid-quest with exact resume."""

from __future__ import annotations

import json
import os

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from tests.conftest import cli, wait_for, write_text_quest
from tests.resume import assert_same_steps, kill_and_finish, trained_steps

pytestmark = pytest.mark.slow



def status(realm):
    out = cli(realm, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)



def test_start_all_trains_a_dropped_file_and_stop_all_leaves_a_checkpoint(make_realm):
    realm = make_realm(training={"save_steps": 1000})
    out = cli(realm, "start-all", "--no-tavern")
    assert out.returncode == 0, out.stderr
    try:
        again = cli(realm, "start-all", "--no-tavern")
        assert again.returncode == 4, again.stdout + again.stderr  # refuses a second instance
        write_text_quest(realm.inbox / "quest.jsonl", 40)
        wait_for(lambda: status(realm)["global_step"] >= 3, what="global step advancing")
        s1 = status(realm)["global_step"]
        wait_for(lambda: status(realm)["quests"] and status(realm)["quests"][0]["state"] == "completed",
                 what="quest completed")
        s = status(realm)
        quest = s["quests"][0]
        assert quest["examples_trained"] == quest["examples_total"] == 40  # every example, once the quest ends
        assert quest["steps"] == s["global_step"] >= s1 >= 3  # every step is this quest's, none lost since s1
        assert s["daemon"]["state"] == "idle" and s["hero"]["parameters"] > 0
    finally:
        stopped = cli(realm, "stop-all", "--timeout", "60")
    assert stopped.returncode == 0 and "daemon: stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    s = status(realm)
    assert s["processes"]["daemon"]["state"] == "stopped"
    assert s["last_checkpoint"]["step"] == s["global_step"]
    assert os.path.isdir(s["last_checkpoint"]["path"])


def test_sigkill_mid_quest_resumes_exactly(make_realm):
    settings = dict(training={"micro_batch_size": 2, "save_steps": 4, "eval_holdout_every": 10})
    # reference: one uninterrupted run
    ref = make_realm("reference", **settings)
    write_text_quest(ref.inbox / "a.jsonl", 50)
    write_text_quest(ref.inbox / "b.jsonl", 30, prefix="bee")
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    expected = trained_steps(Ledger(ref.ledger_path))

    realm = make_realm("killed", **settings)
    write_text_quest(realm.inbox / "a.jsonl", 50)
    write_text_quest(realm.inbox / "b.jsonl", 30, prefix="bee")
    kill_and_finish(realm, (6, 13))
    got = trained_steps(Ledger(realm.ledger_path))
    assert_same_steps(got, expected, rel=1e-5, abs=1e-6)
    lines = [(q, ln) for _, q, lns, _ in got for ln in lns]
    assert len(lines) == len(set(lines))                            # each example exactly once
    quests = Ledger(realm.ledger_path).list_quests()
    assert [q["state"] for q in quests] == ["completed", "completed"]
    assert sum(q["steps"] for q in quests) == got[-1][0]


def test_stop_command_checkpoints_ends_the_daemon_and_the_supervisor_does_not_restart_it(make_realm):
    """``python -m training stop`` (the Tavern's Stop button): the daemon checkpoints and exits 0; the
    supervisor records a normal end (no crash, no restart) and, with nothing left to run, exits."""
    realm = make_realm(training={"save_steps": 1000, "micro_batch_size": 1})
    out = cli(realm, "start-all", "--no-tavern")
    assert out.returncode == 0, out.stderr
    try:
        write_text_quest(realm.inbox / "quest.jsonl", 200)
        wait_for(lambda: status(realm)["global_step"] >= 2, what="training")
        stopped = cli(realm, "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert stopped.stdout.startswith("stop: stopping after a checkpoint\ndaemon stopped at global step ")
        s = status(realm)
        assert s["daemon"]["state"] == "stopped"
        assert s["last_checkpoint"]["step"] == s["global_step"] >= 2  # checkpoint first, nothing lost
        assert s["quests"][0]["state"] == "processing"  # resumes at the next start
        wait_for(lambda: status(realm)["processes"]["supervisor"]["state"] == "stopped",
                 what="the supervisor exits: nothing left to supervise")
        s = status(realm)
        assert s["crashes"] == [] and s["processes"]["daemon"]["state"] == "stopped"
        assert s["supervisor"]["children"]["daemon"]["state"] == "stopped"
        assert s["supervisor"]["children"]["daemon"]["restarts_in_window"] == 0
        again = cli(realm, "stop")
        assert again.returncode == 5 and "nothing to stop" in again.stderr, again.stdout + again.stderr
    finally:
        cli(realm, "stop-all", "--timeout", "60")


def test_sigkill_mid_shuffled_three_epoch_quest_resumes_exactly(make_realm):
    """schools: a shuffled 3-epoch quest killed three times (once in each epoch: 2 examples per step, 27 train
    examples per epoch) trains the same examples per step, with the same losses, as an uninterrupted run:
    the permutation survives restarts."""
    settings = dict(training={"micro_batch_size": 2, "packing": False, "save_steps": 4, "eval_holdout_every": 10},
                    schools={"shuf*.jsonl": {"epochs": 3, "shuffle": True}})
    ref = make_realm("reference", **settings)
    write_text_quest(ref.inbox / "shuf.jsonl", 30)
    assert Daemon(ref, ref.load_config(), until_idle=True).run() == 0
    expected = trained_steps(Ledger(ref.ledger_path))

    realm = make_realm("killed", **settings)
    write_text_quest(realm.inbox / "shuf.jsonl", 30)
    kill_and_finish(realm, (9, 23, 34))
    got = trained_steps(Ledger(realm.ledger_path))
    assert len(got) == 41
    assert_same_steps(got, expected, rel=1e-5, abs=1e-6)
    lines = [ln for _, _, lns, _ in got for ln in lns]
    assert sorted(set(lines)) == [ln for ln in range(1, 31) if ln % 10] and all(lines.count(ln) == 3 for ln in lines)
    assert lines[:27] != sorted(lines[:27])                          # shuffled, not file order
    quest = Ledger(realm.ledger_path).list_quests()[0]
    assert quest["state"] == "completed" and quest["examples_trained"] == quest["examples_total"] == 81
