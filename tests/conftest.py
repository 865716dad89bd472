"""Shared fixtures: temporary realms with small, fast training settings, and the ../shared data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES260K = SHARED / "models" / "stories260K"
SHARED_DATA = SHARED / "data"

# Fast settings for tests: the nano default hero, short rows, frequent checkpoints.
FAST_CONFIG = {
    "hero": {"default_size": "nano"},
    "training": {"max_length": 64, "micro_batch_size": 4, "save_steps": 5, "eval_steps": 0,
                 "eval_holdout_every": 0, "warmup_steps": 2, "learning_rate": 1e-3},
    "ingest": {"settle_seconds": 0.3, "poll_interval_seconds": 0.2},
}


def needs_shared(path: Path = SHARED):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (a fresh clone has no ../shared; "
                              "CI has it)")


def deep_update(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(autouse=True)
def restore_signals():
    """A Daemon run in the test's main thread installs SIGTERM/SIGINT handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def make_realm(tmp_path):
    """make_realm(name="realm", **sections) -> Realm with FAST_CONFIG updated by the given sections."""
    from core.realm import init_realm

    def make(name: str = "realm", **sections):
        return init_realm(tmp_path / name, overrides=deep_update(FAST_CONFIG, sections))

    return make


def write_text_quest(path: Path, n: int, prefix: str = "example") -> Path:
    """A `text` quest of n distinct lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{prefix} {i}: the quick brown fox jumps over the lazy dog"}) + "\n")
    return path


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("REALM_HOME", None)
    return env


PYTHON = sys.executable


def cli(realm, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m training --realm <realm> <args>`` in a real process; output captured as text."""
    return subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), *args],
                          capture_output=True, text=True, timeout=timeout, env=python_env())


def wait_for(predicate, timeout: float = 90.0, what: str = "condition"):
    """Poll ``predicate`` every 0.2 s until it returns a truthy value (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
