"""Webhooks: training events POSTed as signed JSON to the receivers of config ``webhooks``.

**What is sent.** Each webhook subscribes to events (:data:`EVENT_KINDS` maps each to the ledger event
kinds behind it). The dispatcher tails the ledger's ``events`` table and POSTs, for each matching event::

    {"delivery_id": "3f2a...-42", "event": "quest_completed", "kind": "quest_completed", "event_id": 42,
     "time": 1764400000.1, "level": "info", "message": "quest data.jsonl completed: ...",
     "data": {...the event's fields...}, "hero": "hero", "realm": "/path/to/realm"}

with headers ``Content-Type: application/json``, ``X-Realm-Event`` (the event), ``X-Realm-Delivery`` (the
``delivery_id``, the same on every retry: deduplicate on it), ``X-Realm-Timestamp`` (Unix seconds of this
attempt) and ``X-Realm-Signature-256: sha256=<hex>``, the HMAC-SHA256 of the raw body under the webhook's
``secret`` (GitHub's scheme; check it with :func:`verify`, comparing in constant time).

**Delivery.** Per receiver, events go out one at a time in ledger order. A 2xx answer delivers; anything
else (a refused connection, a timeout, a 5xx, a redirect -- never followed) is retried after 1, 2, 4 ...
seconds, at most ``backoff_max_seconds`` (default 300), and later events wait behind it, so a receiver that was down
gets everything it missed, in order, once it is back. After ``max_retry_hours`` since the event, the
delivery is recorded failed (a ``webhook_failed`` warning event) and the next one goes. Every delivery is a
``webhook_deliveries`` row (attempts, last status code, last error); each receiver's position is a kv key
(``webhooks/<key>/position``) moved in the same transaction as the delivery's end, so a restart neither
skips nor repeats a delivered event (a crash between a receiver's 2xx and that transaction sends it once
more, with the same delivery id). A new receiver starts at the end of the ledger: no history is replayed. "The
end" is taken when a process starts its :class:`DispatcherThread` (synchronously, before the supervisor starts
its children or the daemon trains), not when the thread first polls: an event written meanwhile -- the crash of
a daemon killed the moment it started -- is owed to the receiver, not skipped.

**Where it runs.** :class:`Dispatcher` only needs a ledger; one process per realm runs it, the holder of
the lock ``run/webhooks.lock`` (:data:`core.realm.WEBHOOKS_LOCK`; :class:`DispatcherThread`: the supervisor, or the daemon when it runs
alone), in its own thread with its own ledger connection -- training never waits for a receiver, and a
failing receiver or dispatcher never stops training. ``level_up`` events are computed from the game
formula outside ``core/`` and passed in as ``before_poll`` (see ``training/webhooks.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from core.config import RealmConfig, WebhookConfig
from core.fsutil import ExclusiveLock
from core.ledger import DeliveryState, Ledger
from core.realm import WEBHOOKS_LOCK, Realm

EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "quest_completed": ("quest_completed",),                 # core/daemon.py
    "quest_failed": ("quest_failed", "quest_rejected"),      # core/daemon.py: training failed / validation refused
    "level_up": ("level_up",),                               # training/webhooks.py (tavern/game.py's formula)
    "promotion": ("version_promoted",),                      # management/versions.py (vault promote)
    "checkpoint_saved": ("checkpoint_saved",),               # core/engine.py
    "crash": ("crash",),                                     # safety/crash.py (CRASH_EVENT)
    "disk_full_pause": ("disk_full_pause",),                 # management/disk_guard.py
}
"""Webhook event name -> the ledger event kinds it stands for."""
LEVEL_UP_KIND = "level_up"
SIGNATURE_HEADER = "X-Realm-Signature-256"
EVENT_HEADER = "X-Realm-Event"
DELIVERY_HEADER = "X-Realm-Delivery"
TIMESTAMP_HEADER = "X-Realm-Timestamp"
USER_AGENT = "realm-of-training-webhooks"
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
POLL_INTERVAL_SECONDS = 0.5
LOCK_RETRY_SECONDS = 5.0
ERROR_PAUSE_SECONDS = 5.0
MAX_ERROR_CHARS = 500

log = logging.getLogger("realm.webhooks")


def webhook_key(url: str) -> str:
    """A receiver's stable key: the first 16 hex digits of the SHA-256 of its URL."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def position_key_for(url: str) -> str:
    """The kv key holding the id of the last event a receiver is done with."""
    return f"webhooks/{webhook_key(url)}/position"


def register_receivers(ledger: Ledger, hooks: list[WebhookConfig]) -> None:
    """Give each receiver without a position the ledger's current last event id (a new receiver gets
    what happens from now on). Atomic per receiver; an existing position is never moved."""
    for hook in hooks:
        ledger.set_value_if_absent(position_key_for(hook.url), ledger.max_event_id())


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``body`` under ``secret`` (UTF-8), the signature header's value."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does: True when ``header`` is the signature of ``body`` (constant-time compare)."""
    return bool(header) and hmac.compare_digest(sign(secret, body).encode(), header.encode("utf-8", "replace"))


def backoff_seconds(attempts: int, max_seconds: float = BACKOFF_MAX_SECONDS) -> float:
    """Delay after the ``attempts``-th failed attempt: 1, 2, 4, ... seconds, at most ``max_seconds``."""
    return min(max_seconds, BACKOFF_INITIAL_SECONDS * 2 ** min(max(0, attempts - 1), 30))


def event_name(kind: str, subscribed: list[str]) -> str:
    """The webhook event (of ``subscribed``) a ledger ``kind`` belongs to."""
    return next(name for name in subscribed if kind in EVENT_KINDS[name])


@dataclass
class Answer:
    """One attempt's outcome: ``status_code`` (None: no HTTP answer) and ``error`` (None when delivered)."""

    status_code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a redirect is an answer like any non-2xx: retried, never followed


def post(url: str, body: bytes, headers: dict[str, str], timeout_seconds: float) -> Answer:
    """POST ``body`` to ``url``; never raises for network or HTTP problems (they are the Answer's error)."""
    opener = urllib.request.build_opener(_NoRedirects)
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with opener.open(request, timeout=timeout_seconds) as resp:
            resp.read(1 << 16)
            return Answer(resp.status, None)
    except urllib.error.HTTPError as exc:
        exc.close()  # its response's socket
        return Answer(exc.code, f"HTTP {exc.code} {exc.reason}")
    except urllib.error.URLError as exc:
        return Answer(None, f"cannot connect: {exc.reason}")
    except (OSError, ValueError) as exc:  # timeouts, resets, a malformed answer
        return Answer(None, f"{type(exc).__name__}: {exc}")


class Dispatcher:
    """Delivers the ledger's events to ``config.webhooks`` (see the module doc). :meth:`poll` does one
    round; ``before_poll(ledger)`` runs first (the level-up watcher); ``sender`` is :func:`post`."""

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger, *,
                 before_poll: Callable[[Ledger], None] | None = None,
                 sender: Callable[[str, bytes, dict[str, str], float], Answer] = post):
        self.realm, self.config, self.ledger = realm, config, ledger
        self.before_poll, self.sender = before_poll, sender

    def poll(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Deliver what is due to every receiver. Returns the number of attempts made."""
        if self.before_poll is not None:
            self.before_poll(self.ledger)
        return sum(self._drain(hook, should_stop) for hook in self.config.webhooks)

    def _drain(self, hook: WebhookConfig, should_stop: Callable[[], bool]) -> int:
        key = webhook_key(hook.url)
        position_key = position_key_for(hook.url)
        register_receivers(self.ledger, [hook])  # a no-op when DispatcherThread.start registered it
        position = self.ledger.get_value(position_key)
        kinds = sorted({kind for name in hook.events for kind in EVENT_KINDS[name]})
        attempts = 0
        while not should_stop():
            event = self.ledger.next_event(int(position), kinds)
            if event is None:
                return attempts
            name = event_name(event["kind"], list(hook.events))
            delivery = self.ledger.webhook_delivery(key, hook.url, event["id"], name)
            now = time.time()
            if delivery["state"] != DeliveryState.PENDING.value:  # ended already (its position was reset): skip
                self.ledger.set_value(position_key, event["id"])
                position = event["id"]
                continue
            if delivery["next_attempt_at"] is not None and delivery["next_attempt_at"] > now:
                return attempts  # backing off; later events wait (order)
            answer = self._send(hook, key, event, name, now)
            attempts += 1
            if answer.ok:
                self.ledger.webhook_attempt(delivery["id"], state=DeliveryState.DELIVERED,
                                            status_code=answer.status_code, error=None, position_key=position_key)
                position = event["id"]
                continue
            error = (answer.error or "")[:MAX_ERROR_CHARS]
            if now - event["time"] > hook.max_retry_hours * 3600:
                self.ledger.webhook_attempt(delivery["id"], state=DeliveryState.FAILED,
                                            status_code=answer.status_code, error=error, position_key=position_key)
                self.ledger.event("webhook_failed", f"webhook {hook.url}: gave up on event {event['id']} ({name}) "
                                  f"after {delivery['attempts'] + 1} attempts: {error}", level="warning",
                                  url=hook.url, event_id=event["id"], event=name)
                position = event["id"]
                continue
            retry_at = now + backoff_seconds(delivery["attempts"] + 1, hook.backoff_max_seconds)
            self.ledger.webhook_attempt(delivery["id"], state=DeliveryState.PENDING, status_code=answer.status_code,
                                        error=error, next_attempt_at=retry_at)
            log.warning("webhook %s: event %s (%s) not delivered (%s); retry in %.0f s", hook.url, event["id"],
                        name, error, retry_at - now)
            return attempts
        return attempts

    def _send(self, hook: WebhookConfig, key: str, event: dict, name: str, now: float) -> Answer:
        delivery_id = f"{key}-{event['id']}"
        payload = {"delivery_id": delivery_id, "event": name, "kind": event["kind"], "event_id": event["id"],
                   "time": event["time"], "level": event["level"], "message": event["message"],
                   "data": json.loads(event["data"]) if event["data"] else {},
                   "hero": self.config.hero.name, "realm": str(self.realm.root)}
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_HEADER: name,
                   DELIVERY_HEADER: delivery_id, TIMESTAMP_HEADER: str(int(now)),
                   SIGNATURE_HEADER: sign(hook.secret, body)}
        return self.sender(hook.url, body, headers, hook.timeout_seconds)


class DispatcherThread:
    """Runs a :class:`Dispatcher` in a daemon thread with its own ledger connection, while this process
    holds ``run/webhooks.lock`` (it retries every :data:`LOCK_RETRY_SECONDS` otherwise, so exactly one
    process of the realm dispatches). Errors are logged and retried; they never leave the thread."""

    def __init__(self, realm: Realm, config: RealmConfig, *, before_poll: Callable[[Ledger], None] | None = None,
                 poll_interval_seconds: float = POLL_INTERVAL_SECONDS):
        self.realm, self.config, self.before_poll = realm, config, before_poll
        self.poll_interval_seconds = poll_interval_seconds
        self.stop_event = threading.Event()
        self._lock = ExclusiveLock(realm.lock_file(WEBHOOKS_LOCK))
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> DispatcherThread:
        """Register the receivers' positions now (see the module doc: "from now on" is this moment, whichever
        process later holds the lock), then start the thread. Never raises: a ledger that cannot be opened is
        logged (the thread logs it again and stops), training goes on."""
        try:
            ledger = Ledger(self.realm.ledger_path)
            try:
                register_receivers(ledger, list(self.config.webhooks))
            finally:
                ledger.close()
        except Exception:  # noqa: BLE001 - webhooks never stop training
            log.exception("webhooks: cannot register the receivers")
        self._thread.start()
        return self

    def stop(self, timeout_seconds: float = 15.0) -> None:
        """Stop after one last round (events written just before the stop go out if their receiver
        answers); waits at most ``timeout_seconds``."""
        self.stop_event.set()
        self._thread.join(timeout_seconds)

    @property
    def holds_lock(self) -> bool:
        return self._lock.held

    def _run(self) -> None:
        ledger = None
        try:
            while not self._lock.acquire():
                if self.stop_event.wait(LOCK_RETRY_SECONDS):
                    return
            ledger = Ledger(self.realm.ledger_path)
            dispatcher = Dispatcher(self.realm, self.config, ledger, before_poll=self.before_poll)
            log.info("webhooks: delivering to %d receiver(s)", len(self.config.webhooks))
            while True:
                stopping = self.stop_event.is_set()
                try:
                    dispatcher.poll()
                except Exception:  # noqa: BLE001 - a dispatcher problem never reaches training
                    log.exception("webhook dispatch failed; retrying")
                    if self.stop_event.wait(ERROR_PAUSE_SECONDS):
                        break
                if stopping:
                    break
                self.stop_event.wait(self.poll_interval_seconds)
        except Exception:  # noqa: BLE001 - e.g. the ledger cannot be opened: no webhooks, training goes on
            log.exception("the webhook dispatcher stopped")
        finally:
            if ledger is not None:
                ledger.close()
            self._lock.release()
