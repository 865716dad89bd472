"""Post a quest by URL (blueprint ``downloads``): the Tavern downloads a file into the inbox in the
background, through :func:`core.sources.fetch_into_inbox` (the same code as ``enqueue URL``).

- ``POST /api/quests/fetch`` — ``{"url", "priority"}`` (JSON or form). Only ``https://``, ``http://``,
  ``hf://datasets/...``, ``s3://`` and ``gs://`` (never ``file://``: the Tavern reads no local path a
  request names); 400 otherwise, 429 when :data:`MAX_ACTIVE` downloads already run. 202
  ``{"download": row}``: the download runs in a thread of the Tavern and is a ``downloads`` row of the
  ledger (progress, then the published file and its SHA-256, or the error).
- ``GET /api/quests/downloads`` — ``{"downloads": [row...]}``, newest first (at most :data:`LIST_LIMIT`),
  from every process (the CLI's ``enqueue URL`` too). A row: ``id``, ``url``, ``priority``, ``state``
  (downloading / done / failed), ``name``, ``bytes_done``, ``bytes_total`` (null when the server did not
  say), ``sha256``, ``error``, ``quest_id``, ``created_at``, ``updated_at``.

A failed or stopped download leaves nothing in the inbox (core.sources); downloads left ``downloading`` by
a process that died are cleaned up when the Tavern starts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psutil
from flask import Blueprint, Flask, current_app, jsonify, request

from core.realm import PRIORITIES
from core.sources import SourceError, check_url, clean_stale_downloads, fetch_into_inbox
from tavern.context import TavernState, current_ledger, tavern_state

bp = Blueprint("downloads", __name__)
log = logging.getLogger(__name__)

EXTENSION_KEY = "tavern_downloads"
MAX_ACTIVE = 3
LIST_LIMIT = 20
MAX_URL_CHARS = 4096
STOP_JOIN_SECONDS = 2.0
PUBLIC_FIELDS = ("id", "url", "priority", "state", "name", "bytes_done", "bytes_total", "sha256", "error",
                 "quest_id", "created_at", "updated_at")


class Downloads:
    """The app's background downloads: one thread each, stopped (their ``.part`` removed) by :meth:`stop`."""

    def __init__(self, state: TavernState):
        self.state = state
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        try:
            clean_stale_downloads(state.ledger, psutil.pid_exists)
        except Exception:  # noqa: BLE001 - housekeeping never keeps the Tavern from starting
            log.exception("cleaning interrupted downloads failed")

    def active(self) -> int:
        with self.lock:
            self.threads = [t for t in self.threads if t.is_alive()]
            return len(self.threads)

    def start(self, url: str, priority: str) -> int | None:
        """Start downloading ``url`` in a thread; returns the ledger's download id (None if the thread
        failed before creating its row)."""
        created = threading.Event()
        box: dict[str, int] = {}

        def on_start(download_id: int) -> None:
            box["id"] = download_id
            created.set()

        def run() -> None:
            s = self.state
            try:
                fetch_into_inbox(url, s.realm.inbox, priority, config=s.config.sources, ledger=s.ledger,
                                 should_stop=self.stop_event.is_set, on_start=on_start)
            except SourceError as exc:  # recorded in the ledger (downloads row, source_failed event)
                log.warning("download of %s failed: %s", url, exc)
            except Exception:  # noqa: BLE001 - a download never takes the Tavern down
                log.exception("download of %s failed", url)
            finally:
                created.set()

        thread = threading.Thread(target=run, name="tavern-download", daemon=True)
        with self.lock:
            self.threads.append(thread)
        thread.start()
        created.wait(timeout=10.0)
        return box.get("id")

    def stop(self) -> None:
        self.stop_event.set()
        for thread in list(self.threads):
            thread.join(STOP_JOIN_SECONDS)


def init_downloads(app: Flask) -> Downloads:
    manager = Downloads(tavern_state(app))
    app.extensions[EXTENSION_KEY] = manager
    return manager


def stop_downloads(app: Flask) -> None:
    manager = app.extensions.get(EXTENSION_KEY)
    if manager is not None:
        manager.stop()


def public_download(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in PUBLIC_FIELDS}


def _error(status: int, message: str):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


@bp.post("/api/quests/fetch")
def api_fetch():
    data = request.get_json(silent=True)
    body = data if isinstance(data, dict) else request.form.to_dict()
    url, priority = body.get("url"), body.get("priority", "normal")
    if not isinstance(url, str) or not url.strip():
        return _error(400, "url: give the address of a quest file (https://, hf://datasets/..., s3:// or gs://)")
    if len(url) > MAX_URL_CHARS:
        return _error(400, f"url: longer than {MAX_URL_CHARS} characters")
    if priority not in PRIORITIES:
        return _error(400, f"priority must be one of {', '.join(PRIORITIES)}")
    try:
        check_url(url)
    except SourceError as exc:
        if url.strip().lower().startswith("file:"):
            return _error(400, "file:// addresses are not accepted: upload a local file with the form above")
        return _error(400, str(exc))
    manager: Downloads = current_app.extensions[EXTENSION_KEY]
    if manager.active() >= MAX_ACTIVE:
        return _error(429, f"{MAX_ACTIVE} downloads are running already; wait for one to finish")
    download_id = manager.start(url.strip(), priority)
    row = current_ledger().get_download(download_id) if download_id is not None else None
    if row is None:
        return _error(500, "the download could not start; see the Tavern's log")
    resp = jsonify(download=public_download(row))
    resp.status_code = 202
    return resp


@bp.get("/api/quests/downloads")
def api_downloads():
    return jsonify(downloads=[public_download(r) for r in current_ledger().list_downloads(limit=LIST_LIMIT)])
