"""Process primitives: the launcher command of a data parallel daemon, and hard kills that reach its ranks."""

from __future__ import annotations

import subprocess
import sys
import time

from core.distributed import launch_command
from safety.processes import descendants, is_ours, kill_all, training_command
from tests.conftest import wait_for


def test_training_command_through_the_launcher(make_realm):
    realm = make_realm()
    plain = training_command(realm, "daemon", ["--until-idle"])
    assert plain == [sys.executable, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"]
    launched = training_command(realm, "daemon", [], launch_command(2))
    assert launched[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert launched[-5:] == ["-m", "training", "--realm", str(realm.root), "daemon"]


def test_a_launched_daemon_is_still_recognised_as_ours(make_realm):
    realm = make_realm()
    # a stand-in with the launcher's command line shape (python -c ignores the rest of argv)
    args = [sys.executable, "-c", "import time; time.sleep(30)", "-m", "accelerate.commands.launch", "-m", "training",
            "--realm", str(realm.root), "daemon"]
    proc = subprocess.Popen(args)
    try:
        wait_for(lambda: is_ours(proc.pid, "daemon", realm), timeout=10, what="exec")  # (Popen returns before it)
        assert not is_ours(proc.pid, "tavern", realm)
    finally:
        proc.kill()
        proc.wait()


def test_kill_all_reaches_the_ranks_a_launcher_started():
    # a "launcher" whose two "ranks" would outlive it if only it were killed
    launcher = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        members = []
        for _ in range(100):
            members = descendants(launcher.pid)
            if len(members) == 2:
                break
            time.sleep(0.05)
        assert len(members) == 2
        launcher.kill()
        launcher.wait()
        assert all(m.is_running() for m in members)  # orphaned, still running
        kill_all(members)
        for m in members:
            m.wait(timeout=10)
        assert not any(m.is_running() for m in members)
        kill_all(members)  # gone already: nothing happens
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert descendants(launcher.pid) == []
