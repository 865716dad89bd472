"""Tavern fixtures: tmp realms, the Flask app, a live server on a free port, a training-daemon stand-in that
writes real ledger rows, and a real headless Chromium driven by Playwright.

- ``tavern_realm``: a tmp realm (tests/conftest.py FAST_CONFIG).
- ``app`` / ``client``: ``create_app(realm, testing=True)`` (push poller not started) and its test client.
- ``live_tavern`` (or ``running_tavern(realm, config)``): the real Werkzeug server (``tavern.server.make_tavern_server``) on 127.0.0.1, a free
  port, in a thread: ``.url``, ``.realm``, ``.app``, ``.ledger`` (a second connection, as the daemon has).
- ``LedgerWriter``: writes what the daemon writes (``daemon`` kv heartbeat, ``steps``/``evals`` rows) in a
  thread and acknowledges control commands, through the real SQLite ledger. It stands in for the daemon
  *process* only; the Tavern under test is the real one.
- ``browser`` (session) / ``page``: Chromium at ``/usr/bin/chromium`` (``make test`` installs it); tests
  skip with the reason when it is absent. ``page.console_errors`` collects console errors (CSP violations).
- ``save_screenshot(page, name)`` → ``docs/screenshots/<name>.png`` (shown in the README).
"""

from __future__ import annotations

import math
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.config import RealmConfig
from core.ledger import CommandState, Ledger
from core.realm import Realm

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = Path(os.environ.get("TAVERN_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture
def tavern_realm(make_realm) -> Realm:
    return make_realm("tavern_realm")


@pytest.fixture
def app(tavern_realm):
    from tavern.app import close_app, create_app

    application = create_app(tavern_realm, testing=True)
    yield application
    close_app(application)


@pytest.fixture
def client(app):
    return app.test_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveTavern:
    url: str
    realm: Realm
    app: object
    ledger: Ledger  # the "daemon's" connection: write rows here


@contextmanager
def running_tavern(realm: Realm, config: RealmConfig | None = None):
    """The real server (``make_tavern_server``) on 127.0.0.1 and a free port, in a thread."""
    from tavern.app import close_app
    from tavern.server import make_tavern_server

    server, application = make_tavern_server(realm, config, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.serve_forever, name="tavern-test-server", daemon=True)
    thread.start()
    ledger = Ledger(realm.ledger_path)
    try:
        yield LiveTavern(f"http://127.0.0.1:{server.server_port}", realm, application, ledger)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        close_app(application)
        ledger.close()


@pytest.fixture
def live_tavern(tavern_realm):
    with running_tavern(tavern_realm) as live:
        yield live


class LedgerWriter:
    """Writes a training run's rows into the ledger like the daemon does: one step every
    ``step_interval_seconds`` (loss 3.0 decaying toward 1.0), an eval every 5 steps, the ``daemon`` kv
    heartbeat, and acknowledges pause/resume/skip/stop commands (pause really stops the steps)."""

    def __init__(self, ledger: Ledger, quest_id: int | None = None, step_interval_seconds: float = 0.2,
                 start_step: int = 0, hero_name: str = "hero"):
        self.ledger, self.quest_id, self.interval = ledger, quest_id, step_interval_seconds
        self.global_step, self.hero_name = start_step, hero_name
        self.paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)

    def __enter__(self) -> LedgerWriter:
        self.heartbeat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def heartbeat(self, state: str | None = None) -> None:
        self.ledger.set_value("daemon", {
            "state": state or ("paused" if self.paused else "training"), "pid": os.getpid(),
            "global_step": self.global_step, "quest_id": self.quest_id,
            "hero": {"name": self.hero_name, "base_model": None, "architecture": "Qwen3ForCausalLM",
                     "parameters": 1_234_567, "newborn": True},
            "tokens_per_second": 512.0, "eta_seconds": None, "last_checkpoint": None})

    def step(self) -> None:
        self.global_step += 1
        s = self.global_step
        self.ledger.record_step(global_step=s, quest_id=self.quest_id, loss=1.0 + 2.0 * math.exp(-s / 50),
                                learning_rate=1e-3, grad_norm=0.8, tokens=256, tokens_per_second=512.0,
                                example_start=(s - 1) * 4, example_end=s * 4, example_lines=[],
                                quest_steps=s)
        if s % 5 == 0:
            self.ledger.record_eval(s, self.quest_id, 1.2 + 2.0 * math.exp(-s / 60), 8)

    def _run(self) -> None:
        while not self._stop.is_set():
            for cmd in self.ledger.pending_commands():
                name = cmd["command"]
                self.paused = {"pause": True, "resume": False}.get(name, self.paused)
                self.ledger.finish_command(cmd["id"], CommandState.DONE, f"{name} done by the test writer")
            if not self.paused:
                self.step()
            self.heartbeat()
            self._stop.wait(self.interval)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: `make test` installs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    pg.set_default_timeout(10_000)
    yield pg
    context.close()


def save_screenshot(page, name: str) -> Path:
    """Full-page PNG at docs/screenshots/<name>.png (for the README)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
