"""The cross-process contract: the one liveness rule (real processes, SIGKILL) and the one ETA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from core.contract import (
    HEARTBEAT_STALE_SECONDS,
    NOT_RESPONDING,
    NOT_RUNNING,
    DaemonState,
    process_alive,
    process_identity,
    quest_eta,
    read_daemon_status,
)


@pytest.fixture
def sleeper():
    """A real child process (the stand-in for a daemon's pid); killed and reaped at the end."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_live_daemon_shows_its_own_state(sleeper):
    now = time.time()
    d = read_daemon_status({"state": "training", **process_identity(sleeper.pid)}, now - 2, now)
    assert d.display_state == "training" and d.alive and d.process_alive is True
    assert d.heartbeat_age_seconds == pytest.approx(2) and d.pid == sleeper.pid


def test_sigkilled_daemon_is_not_running_at_once_zombie_or_reaped(sleeper):
    value = {"state": "training", **process_identity(sleeper.pid)}
    now = time.time()
    os.kill(sleeper.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _is_zombie(sleeper.pid):  # killed, not reaped yet
        time.sleep(0.01)
    d = read_daemon_status(value, now, now)  # a fresh heartbeat: only the pid tells
    assert d.display_state == NOT_RUNNING and not d.alive and d.process_alive is False
    sleeper.wait()  # reaped: the pid is gone altogether
    assert read_daemon_status(value, now, now).display_state == NOT_RUNNING


def _is_zombie(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_reused_pid_is_not_the_daemon(sleeper):
    identity = process_identity(sleeper.pid)
    assert process_alive(sleeper.pid, identity["pid_started_at"])
    assert not process_alive(sleeper.pid, identity["pid_started_at"] - 3600)  # another process, same pid
    assert process_alive(sleeper.pid)  # no start time published (older daemons): the pid alone


def test_stale_heartbeat_of_a_live_pid_is_not_responding():
    now = time.time()
    value = {"state": "idle", "pid": os.getpid()}
    assert read_daemon_status(value, now - HEARTBEAT_STALE_SECONDS + 1, now).display_state == "idle"
    stale = read_daemon_status(value, now - HEARTBEAT_STALE_SECONDS - 1, now)
    assert stale.display_state == NOT_RESPONDING and not stale.alive
    # the supervisor applies the same rule with its own limit
    assert read_daemon_status(value, now - 60, now, stale_after_seconds=900).display_state == "idle"


@pytest.mark.parametrize("value,expected", [
    (None, NOT_RUNNING), ({}, NOT_RUNNING), ("garbage", NOT_RUNNING),
    ({"state": "stopped", "pid": os.getpid()}, "stopped"),
    ({"state": "stopping", "pid": os.getpid()}, "stopping"),
    ({"state": "training", "pid": 2**22 + 12345}, NOT_RUNNING),  # no such process
    ({"state": "training", "pid": True}, "training"),  # not a pid: the heartbeat alone decides
    ({"pid": os.getpid()}, "unknown"),
])
def test_liveness_verdicts(value, expected):
    now = time.time()
    d = read_daemon_status(value, now, now)
    assert d.display_state == expected
    assert d.alive == (expected not in (NOT_RUNNING, NOT_RESPONDING, "stopped"))


def test_daemon_states_are_the_published_strings():
    assert [s.value for s in DaemonState] == ["starting", "idle", "training", "paused", "stopping", "stopped"]


def test_eta_from_the_quests_recent_steps():
    # newest first: 8 examples per step, one step every 2 s -> 4 examples/s
    steps = [{"time": 100.0 - 2 * i, "example_end": 80 - 8 * i} for i in range(10)]
    eta = quest_eta(steps, examples_total=200, examples_trained=80)
    assert eta.examples_per_second == pytest.approx(4.0)
    assert eta.eta_seconds == pytest.approx(120 / 4.0)
    assert quest_eta(steps, examples_total=50, examples_trained=80).eta_seconds == 0  # overshoot: done


@pytest.mark.parametrize("steps,total", [
    ([], 100),                                                    # nothing yet
    ([{"time": 5.0, "example_end": 8}], 100),                     # one step: no interval
    ([{"time": 5.0, "example_end": 8}, {"time": 5.0, "example_end": 0}], 100),  # no time passed
    ([{"time": 9.0, "example_end": 8}, {"time": 5.0, "example_end": 8}], 100),  # no progress
    ([{"time": 9.0, "example_end": 16}, {"time": 5.0, "example_end": 8}], None),  # total unknown
])
def test_eta_is_unknown_without_a_rate_or_a_total(steps, total):
    eta = quest_eta(steps, examples_total=total, examples_trained=8)
    assert eta.eta_seconds is None
    if total is None:
        assert eta.examples_per_second == pytest.approx(2.0)
