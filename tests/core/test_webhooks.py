"""Webhook dispatch (core/webhooks.py) against a real local receiver and the real SQLite ledger: signatures,
order, retries with backoff while the receiver is down, each event once, the event kinds are the ones the
code really writes; the level-up watcher (training/webhooks.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from core.config import ConfigError, parse_config
from core.ledger import Ledger
from core.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    EVENT_KINDS,
    LEVEL_UP_KIND,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Dispatcher,
    DispatcherThread,
    backoff_seconds,
    sign,
    verify,
    webhook_key,
)
from tests.conftest import wait_for
from tests.local_http import Receiver

ROOT = Path(__file__).resolve().parents[2]
SECRET = "It's a Secret to Everybody"


def test_signature_is_github_style_hmac_sha256():
    # GitHub's documented example: secret "It's a Secret to Everybody", payload "Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign(SECRET, b"Hello, World!") == expected
    assert verify(SECRET, b"Hello, World!", expected)
    assert not verify(SECRET, b"Hello, World?", expected) and not verify("other", b"Hello, World!", expected)
    assert not verify(SECRET, b"Hello, World!", None) and not verify(SECRET, b"x", "sha256=é")


def test_backoff_doubles_up_to_five_minutes():
    assert [backoff_seconds(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff_seconds(30) == 300


def test_every_event_kind_is_one_the_code_really_writes():
    sources = {p: p.read_text(encoding="utf-8") for pkg in ("core", "safety", "management", "training")
               for p in (ROOT / pkg).rglob("*.py") if p.name not in ("webhooks.py", "config.py")}
    for name, kinds in EVENT_KINDS.items():
        for kind in kinds:
            if kind == LEVEL_UP_KIND:  # written by training/webhooks.py through the constant
                assert "LEVEL_UP_KIND" in (ROOT / "training" / "webhooks.py").read_text()
                continue
            pattern = re.compile(rf'(\.event\(\s*|_EVENT = |\.event_with_value\(\s*)"{kind}"')
            assert any(pattern.search(src) for src in sources.values()), f"{name}: nothing writes {kind!r}"
    from core.config import WebhookEvent

    assert set(WebhookEvent.__args__) == set(EVENT_KINDS)


def test_webhook_config_is_checked():
    ok = parse_config({"webhooks": [{"url": "https://example.org/hook", "secret": "s"}]})
    assert ok.webhooks[0].events == list(EVENT_KINDS)
    with pytest.raises(ConfigError) as info:
        parse_config({"webhooks": [{"url": "ftp://example.org/x", "events": ["quest_done"]}, {"url": "http://x"}]})
    text = str(info.value)
    assert "webhooks.0.url: Value error, must be an http:// or https:// address" in text
    assert "webhooks.0.events.0" in text and "webhooks.0.secret: Field required" in text
    assert "webhooks.1.secret: Field required" in text


def make(realm, ledger, receiver_url, events=None, **extra):
    config = parse_config({"webhooks": [{"url": receiver_url, "secret": SECRET, **({"events": events} if events
                                                                                    else {}), **extra}]})
    return Dispatcher(realm, config, ledger)


@pytest.fixture
def realm(make_realm):
    return make_realm()


@pytest.fixture
def ledger(realm):
    led = Ledger(realm.ledger_path)
    yield led
    led.close()


def bodies(receiver) -> list[dict]:
    return [json.loads(r["body"]) for r in receiver.snapshot()]


def test_events_are_signed_and_delivered_in_order(realm, ledger):
    receiver = Receiver().start()
    try:
        ledger.event("quest_completed", "before the receiver existed", quest_id=0)  # not replayed
        dispatcher = make(realm, ledger, receiver.url, events=["quest_completed", "quest_failed", "checkpoint_saved"])
        assert dispatcher.poll() == 0
        ledger.event("quest_completed", "quest a completed", quest_id=1)
        ledger.event("quest_queued", "not subscribed")
        ledger.event("checkpoint_saved", "step 5", step=5, path="/x")
        ledger.event("quest_rejected", "b rejected", level="error", quest_id=2)
        assert dispatcher.poll() == 3
    finally:
        receiver.stop()
    got = receiver.snapshot()
    assert [json.loads(r["body"])["event"] for r in got] == ["quest_completed", "checkpoint_saved", "quest_failed"]
    first = got[0]
    body = json.loads(first["body"])
    assert body["kind"] == "quest_completed" and body["data"] == {"quest_id": 1} and body["hero"] == "hero"
    assert body["realm"] == str(realm.root) and body["message"] == "quest a completed"
    assert first["headers"][SIGNATURE_HEADER.lower()] == sign(SECRET, first["body"])
    assert first["headers"][EVENT_HEADER.lower()] == "quest_completed"
    assert first["headers"][DELIVERY_HEADER.lower()] == body["delivery_id"] == f"{webhook_key(receiver.url)}-{body['event_id']}"
    assert abs(int(first["headers"][TIMESTAMP_HEADER.lower()]) - time.time()) < 60
    assert json.loads(got[2]["body"])["kind"] == "quest_rejected"
    rows = ledger.webhook_deliveries()
    assert [(r["state"], r["attempts"], r["status_code"]) for r in rows] == [("delivered", 1, 204)] * 3
    assert dispatcher.poll() == 0 and len(receiver.snapshot()) == 3  # each once


def test_a_receiver_that_was_down_gets_everything_later_in_order_once(realm, ledger):
    receiver = Receiver()  # port reserved, nobody listening yet
    dispatcher = make(realm, ledger, receiver.url)
    dispatcher.poll()
    for i in range(4):
        ledger.event("quest_completed", f"quest {i} completed", quest_id=i)
    assert dispatcher.poll() == 1  # the first fails; the others wait behind it (order)
    [row] = ledger.webhook_deliveries()
    assert row["state"] == "pending" and row["attempts"] == 1 and row["status_code"] is None
    assert "cannot connect" in row["error"] and row["next_attempt_at"] > time.time()
    assert dispatcher.poll() == 0  # backing off: no attempt before next_attempt_at
    time.sleep(backoff_seconds(1) + 0.1)
    assert dispatcher.poll() == 1 and ledger.webhook_deliveries()[0]["attempts"] == 2  # still down
    receiver.start()
    try:
        wait_for(lambda: dispatcher.poll() or len(receiver.snapshot()) == 4, timeout=10, what="catch up")
        dispatcher.poll()
    finally:
        receiver.stop()
    got = bodies(receiver)
    assert [b["data"]["quest_id"] for b in got] == [0, 1, 2, 3]
    assert len({b["delivery_id"] for b in got}) == 4
    rows = ledger.webhook_deliveries()
    assert [r["state"] for r in rows] == ["delivered"] * 4 and rows[0]["attempts"] == 3


def test_errors_are_recorded_and_old_events_are_given_up(realm, ledger):
    receiver = Receiver(status=500).start()
    try:
        dispatcher = make(realm, ledger, receiver.url, max_retry_hours=0.0001)  # 0.36 s
        dispatcher.poll()
        ledger.event("crash", "daemon crashed (cpu_oom)", level="error")
        ledger.event("disk_full_pause", "disk full", level="error")
        assert dispatcher.poll() == 1
        row = ledger.webhook_deliveries()[0]
        assert (row["state"], row["status_code"], row["error"]) == ("pending", 500, "HTTP 500 Internal Server Error")
        time.sleep(1.1)  # older than max_retry_hours, and past the backoff
        assert dispatcher.poll() == 2  # both fail again and are too old: given up, in order
        receiver.status = 200
        ledger.event("crash", "tavern crashed (signal)", level="error")
        assert dispatcher.poll() == 1
    finally:
        receiver.stop()
    rows = ledger.webhook_deliveries()
    assert [(r["state"], r["attempts"]) for r in rows] == [("failed", 2), ("failed", 1), ("delivered", 1)]
    assert [json.loads(r["body"])["message"] for r in receiver.snapshot()][-1] == "tavern crashed (signal)"
    gave_up = ledger.last_event("webhook_failed")
    assert gave_up is not None and "gave up on event" in gave_up["message"]


def test_one_process_dispatches_at_a_time(realm):
    config = parse_config({"webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": "s"}]})
    first = DispatcherThread(realm, config).start()
    wait_for(lambda: first.holds_lock, timeout=10, what="lock")
    second = DispatcherThread(realm, config).start()
    time.sleep(0.5)
    assert not second.holds_lock
    second.stop()
    first.stop()
    assert not first.holds_lock


def test_level_ups_are_announced_once(realm, ledger):
    from training.webhooks import LEVEL_KEY, watch_level

    def steps(upto):
        for s in range(ledger.last_step()["global_step"] + 1 if ledger.last_step() else 1, upto + 1):
            ledger.record_step(global_step=s, quest_id=None, loss=1.0, learning_rate=1e-3, grad_norm=0.5,
                               tokens=10, tokens_per_second=1.0, example_start=0, example_end=0, example_lines=[],
                               quest_steps=s)

    steps(10)
    watch_level(ledger)  # first look: records level 1 silently
    assert ledger.get_value(LEVEL_KEY) == 1 and ledger.last_event(LEVEL_UP_KIND) is None
    steps(49)
    watch_level(ledger)
    assert ledger.last_event(LEVEL_UP_KIND) is None
    steps(50)  # XP 50 = level 2
    watch_level(ledger)
    watch_level(ledger)
    events = [e for e in ledger.events() if e["kind"] == LEVEL_UP_KIND]
    assert len(events) == 1 and json.loads(events[0]["data"]) == {
        "new_level": 2, "previous_level": 1, "title": "Newborn", "global_step": 50}
    ledger.rollback_to(40)  # a crash lost steps: climbing back to level 2 is no new level-up
    steps(60)
    watch_level(ledger)
    assert len([e for e in ledger.events() if e["kind"] == LEVEL_UP_KIND]) == 1
    steps(150)  # level 3 at 150
    watch_level(ledger)
    assert json.loads(ledger.last_event(LEVEL_UP_KIND)["data"])["new_level"] == 3


def test_a_receiver_is_owed_what_happens_after_its_process_started_not_after_its_first_poll(realm, monkeypatch):
    """The crash of a daemon killed the moment it started was lost when the supervisor's dispatcher thread
    polled for the first time only after the crash event was written (its position then started past it)."""
    import core.webhooks as webhooks
    from core.fsutil import ExclusiveLock
    from core.realm import WEBHOOKS_LOCK

    monkeypatch.setattr(webhooks, "LOCK_RETRY_SECONDS", 0.2)
    receiver = Receiver().start()
    config = parse_config({"webhooks": [{"url": receiver.url, "secret": SECRET, "events": ["crash"]}]})
    other = ExclusiveLock(realm.lock_file(WEBHOOKS_LOCK))  # another process's dispatcher holds the lock ...
    assert other.acquire()
    ledger = Ledger(realm.ledger_path)
    try:
        ledger.event("before", "written before the dispatcher started: not owed")
        thread = DispatcherThread(realm, config).start()
        ledger.event("crash", "daemon killed", level="error", process="daemon")  # ... while this happens
        time.sleep(0.5)
        assert receiver.snapshot() == []  # not the lock holder: nothing sent
        other.release()  # ... and dies without polling
        got = wait_for(receiver.snapshot, timeout=10, what="the crash delivered by the new lock holder")
        assert [json.loads(r["body"])["event"] for r in got] == ["crash"]
        thread.stop()
    finally:
        ledger.close()
        receiver.stop()
