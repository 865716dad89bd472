"""Shared fixtures: temporary realms with small, fast training settings, and the ../shared data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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
    # tests drop their own quests; the ones about the hero loop turn idle generation on
    "idle_generation": {"enabled": False},
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


# --- threads: a test ends with the threads it started ended -----------------------------------------------
THREAD_GRACE_SECONDS = 5.0
"""How long a test's threads get to finish after its teardown (a stopped server's last request, a watcher's
emitter noticing its stop flag) before they count as leaked."""

KNOWN_LIBRARY_THREADS: dict[str, str] = {
    # thread target ("module.qualname") or name prefix -> why it may outlive the test that started it
    "engineio.socket.Socket._send_ping":
        "engineio's per-connection ping timer is a plain time.sleep(ping_interval) (25 s) that nothing can "
        "interrupt; once its socket is closed it sends nothing and ends",
    "tqdm_monitor":
        "tqdm starts one monitor thread per process with its first progress bar (e.g. transformers' 'Loading "
        "weights' in a test that runs before anything disabled HF's bars) and never stops it",
    "asyncio_":
        "workers of the default executor of the event loop that Playwright's sync API drives: the loop "
        "starts them in whichever browser test first needs one and they live as long as the session-wide "
        "Playwright (tests/tavern/conftest.py), which ends them when it stops",
}


def thread_key(thread: threading.Thread) -> str:
    """``module.qualname`` of the thread's target (its name once it has run)."""
    target = getattr(thread, "_target", None)  # None once run() has returned
    if target is None:
        return thread.name
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def _known_library_thread(thread: threading.Thread) -> bool:
    key = thread_key(thread)
    return any(key == known or thread.name.startswith(known) for known in KNOWN_LIBRARY_THREADS)


_CLAIMS: dict[str, tuple[set[threading.Thread], Callable[[threading.Thread], bool]]] = {}
"""Threads that a module/session-scoped fixture owns (see :func:`claim_threads`), by fixture name: the threads
it started while being set up, and a predicate for the ones it starts later, during some test."""


def claim_threads(request, predicate: Callable[[threading.Thread], bool], why: str) -> None:
    """Inside a module/session-scoped fixture: the threads matching ``predicate`` belong to this fixture, not
    to the test that happens to make it start them (``why`` says why they outlive it, for the reader); they
    must have ended when the fixture is torn down."""
    assert request.scope != "function" and why
    started, _ = _CLAIMS.get(request.fixturename, (set(), None))
    _CLAIMS[request.fixturename] = (started, predicate)


def _claimed(thread: threading.Thread) -> bool:
    return any(thread in started or predicate(thread) for started, predicate in _CLAIMS.values())


def _left_running(before: set[threading.Thread], grace_seconds: float, *,
                  only: Callable[[threading.Thread], bool] | None = None) -> list[threading.Thread]:
    """Threads alive now that were not in ``before`` (and are not known library threads, and match ``only``
    when given), after waiting up to ``grace_seconds`` for them to end."""
    deadline = time.monotonic() + grace_seconds
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()
                and not _known_library_thread(t) and (only is None or only(t))]
        if not left or time.monotonic() >= deadline:
            return left
        left[0].join(timeout=max(0.0, min(0.1, deadline - time.monotonic())))


def _describe(threads: list[threading.Thread]) -> str:
    return ", ".join(f"{t.name!r} (target {thread_key(t)}, daemon={t.daemon})" for t in threads)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Threads a module/session-scoped fixture starts while it is set up are its own (checked at its end)."""
    if fixturedef.scope == "function":
        yield
        return
    before = set(threading.enumerate())
    yield
    started = set(threading.enumerate()) - before
    if started:
        claimed, predicate = _CLAIMS.get(fixturedef.argname, (set(), lambda t: False))
        _CLAIMS[fixturedef.argname] = (claimed | started, predicate)


def pytest_fixture_post_finalizer(fixturedef, request):
    if fixturedef.scope == "function" or fixturedef.argname not in _CLAIMS:
        return
    started, predicate = _CLAIMS.pop(fixturedef.argname)
    left = _left_running(set(), THREAD_GRACE_SECONDS, only=lambda t: t in started or predicate(t))
    if left:
        pytest.fail(f"fixture {fixturedef.argname!r} left threads running after its teardown: "
                    f"{_describe(left)}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread running: every thread it (or its function-scoped fixtures) started
    must have ended within ``THREAD_GRACE_SECONDS`` of its teardown. Autouse, so set up before and torn
    down after the test's other function-scoped fixtures. Exceptions: :data:`KNOWN_LIBRARY_THREADS`, and
    threads owned by a wider-scoped fixture (:func:`claim_threads`), checked when that fixture ends."""
    before = set(threading.enumerate())
    yield
    left = _left_running(before, THREAD_GRACE_SECONDS, only=lambda t: not _claimed(t))
    if left:
        pytest.fail(f"the test left threads running: {_describe(left)}", pytrace=False)


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
