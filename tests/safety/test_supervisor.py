"""The supervisor with real processes: restart after SIGKILL, hang detection, give up, warm stop-all."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from core.ledger import Ledger
from safety.processes import alive, read_pid
from safety.supervisor import TRANSITIONS, Child, ChildState, Supervisor, TransitionError
from tests.conftest import PYTHON, python_env, wait_for, write_text_quest
from tests.conftest import cli as _cli


def cli(realm, *args, timeout=180):
    return _cli(realm, *args, timeout=timeout)


FAST_SUPERVISOR = {"backoff_initial_seconds": 0.2, "poll_interval_seconds": 0.2, "stop_timeout_seconds": 60}




def events(realm, kind=None):
    ledger = Ledger(realm.ledger_path)
    try:
        rows = ledger.events(limit=100000)
    finally:
        ledger.close()
    return [e for e in rows if kind is None or e["kind"] == kind]


def kv(realm, key):
    ledger = Ledger(realm.ledger_path)
    try:
        return ledger.get_value(key)
    finally:
        ledger.close()


def last_step(realm):
    ledger = Ledger(realm.ledger_path)
    try:
        row = ledger.last_step()
    finally:
        ledger.close()
    return row["global_step"] if row else 0


def test_only_allowed_transitions(make_realm):
    assert TRANSITIONS[ChildState.FATAL] == frozenset()
    sup = Supervisor(make_realm(), make_realm().load_config(), roles=("daemon",))
    child = Child("daemon")
    with pytest.raises(TransitionError):
        sup._set_state(child, ChildState.BACKOFF, "a stopped process cannot crash")
    assert child.state == ChildState.STOPPED


@pytest.mark.slow
def test_sigkilled_daemon_is_restarted_a_hang_is_killed_and_stop_all_is_warm(make_realm):
    # stop_timeout_seconds: how long a hung daemon gets after SIGTERM (stop-all passes its own --timeout)
    realm = make_realm(training={"save_steps": 3}, retention={"enabled": False},
                       supervisor={**FAST_SUPERVISOR, "hang_minutes": 0.4, "stop_timeout_seconds": 3})
    write_text_quest(realm.inbox / "long.jsonl", 3000)
    started = cli(realm, "start-all", "--no-tavern")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        assert "supervisor started" in started.stdout
        supervisor_pid = read_pid(realm, "supervisor")
        assert cli(realm, "start-all", "--no-tavern").returncode == 4          # one instance per realm
        wait_for(lambda: last_step(realm) >= 4, what="training")
        first = read_pid(realm, "daemon")
        killed_at = last_step(realm)
        os.kill(first, signal.SIGKILL)

        second = wait_for(lambda: (p := read_pid(realm, "daemon")) not in (None, first) and alive(p) and p,
                          what="a restarted daemon")
        wait_for(lambda: last_step(realm) > killed_at, what="training to continue past the kill")
        crash = events(realm, "crash")[-1]
        data = json.loads(crash["data"])
        assert data["crash_class"] == "signal" and data["pid"] == first and data["signal"] == "SIGKILL"
        status = json.loads(cli(realm, "status", "--json").stdout)
        assert status["last_crash"]["pid"] == first and status["processes"]["supervisor"]["state"] == "running"
        assert status["supervisor"]["children"]["daemon"]["restarts_in_window"] >= 1

        os.kill(second, signal.SIGSTOP)                                         # a hang: no heartbeat
        third = wait_for(lambda: (p := read_pid(realm, "daemon")) not in (None, second) and alive(p) and p,
                         timeout=120, what="the hung daemon replaced")
        hang = json.loads(events(realm, "crash")[-1]["data"])
        assert hang["crash_class"] == "hang" and hang["pid"] == second
        wait_for(lambda: (kv(realm, "daemon") or {}).get("pid") == third and
                 kv(realm, "daemon").get("state") == "training", what="the third daemon training")
    finally:
        stopped = cli(realm, "stop-all", "--timeout", "60")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "supervisor: stopped" in stopped.stdout and "daemon: stopped" in stopped.stdout
    assert not alive(supervisor_pid) and not alive(third) and not alive(second)
    kinds = [e["kind"] for e in events(realm)]
    assert kinds.count("daemon_stopped") >= 1 and kinds[-1] == "supervisor_stopped"  # warm: the daemon saved
    saved = [json.loads(e["data"]) for e in events(realm, "checkpoint_saved")]
    # nothing lost at the warm stop: the last checkpoint holds the last step (saved at the stop, or by
    # save_steps when the stop came right after such a save: then there is nothing new to save)
    assert saved[-1]["step"] == last_step(realm) and saved[-1]["reason"] in ("stop", "save_steps")
    children = kv(realm, "supervisor")["children"]
    assert children["daemon"]["state"] == "stopped" and kv(realm, "supervisor")["state"] == "stopped"
    status = json.loads(cli(realm, "status", "--json").stdout)
    assert {p["state"] for p in status["processes"].values()} == {"stopped"}


@pytest.mark.slow
def test_gives_up_after_max_restarts_with_an_alert(make_realm):
    realm = make_realm(hero={"base_model": "./no-such-model"},
                       supervisor={**FAST_SUPERVISOR, "max_restarts": 2, "restart_window_minutes": 5})
    done = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "supervise", "--no-tavern"],
                          capture_output=True, text=True, timeout=120, env=python_env())
    assert done.returncode == 10, done.stdout + done.stderr
    crashes = [json.loads(e["data"]) for e in events(realm, "crash")]
    assert len(crashes) == 3 and {c["crash_class"] for c in crashes} == {"other"}
    assert all("HeroError" in c["summary"] for c in crashes)
    gave_up = events(realm, "supervisor_gave_up")
    assert len(gave_up) == 1 and gave_up[0]["level"] == "error" and "2 restarts" in gave_up[0]["message"]
    assert kv(realm, "supervisor")["children"]["daemon"]["state"] == "fatal"
    assert read_pid(realm, "daemon") is None


def test_one_supervisor_per_realm(make_realm, capsys):
    import fcntl

    from training.cli import main

    realm = make_realm()
    fd = os.open(realm.run_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running supervisor holds
    try:
        assert main(["--realm", str(realm.root), "supervise", "--no-tavern"]) == 4
    finally:
        os.close(fd)
    assert "another supervisor runs" in capsys.readouterr().err
    assert read_pid(realm, "daemon") is None
