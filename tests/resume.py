"""Helpers for the exact-resume tests: run the real daemon as a process, SIGKILL it once the ledger reaches a
global step, finish with ``daemon --until-idle``, and read what was trained."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from core.ledger import Ledger
from tests.conftest import PYTHON, python_env, wait_for


def trained_steps(ledger: Ledger) -> list[tuple]:
    """``(global_step, quest_id, example lines, loss)`` of every step in the ledger, in order."""
    return [(row["global_step"], row["quest_id"], tuple(json.loads(row["examples_json"])), row["loss"])
            for row in ledger.steps()]


def kill_daemon_at(realm, step: int, timeout: float = 300) -> None:
    """Start ``daemon`` as a real process (its output in ``<realm>/daemon-killed-at-<step>.log``, never an
    unread pipe), SIGKILL it once the ledger's last global step is ``>= step``; AssertionError (naming the
    log) when that takes longer than ``timeout`` seconds."""
    log_path = realm.root / f"daemon-killed-at-{step}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon"], env=python_env(),
                                stdout=log, stderr=subprocess.STDOUT)
    ledger = None

    def reached():
        nonlocal ledger
        if ledger is None and realm.ledger_path.exists():
            ledger = Ledger(realm.ledger_path)
        last = ledger.last_step() if ledger else None
        return last and last["global_step"] >= step

    try:
        wait_for(reached, timeout=timeout, what=f"global step {step} (daemon log: {log_path})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if ledger is not None:
            ledger.close()


def finish_until_idle(realm, timeout: float = 300) -> None:
    """Run ``daemon --until-idle`` to the end; AssertionError with its stderr when it fails."""
    done = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"],
                          env=python_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_and_finish(realm, kill_at_steps, timeout: float = 300) -> None:
    """:func:`kill_daemon_at` each step of ``kill_at_steps`` in turn, then :func:`finish_until_idle`."""
    for step in kill_at_steps:
        kill_daemon_at(realm, step, timeout)
    finish_until_idle(realm, timeout)


def assert_same_steps(got: list[tuple], expected: list[tuple], *, rel: float = 0.0, abs: float = 1e-5) -> None:
    """Two :func:`trained_steps` lists: the same global steps with the same quests and example lines in the same
    order, and losses within ``rel`` / ``abs``."""
    assert [g[:3] for g in got] == [e[:3] for e in expected]        # same steps, same examples, same order
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], rel=rel, abs=abs)


def assert_same_step_metrics(got: dict[int, dict], expected: dict[int, dict], *, abs: float = 1e-5) -> None:
    """Two ``Ledger.step_metrics()``: the same steps, each school metric within ``abs``."""
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, abs=abs)
