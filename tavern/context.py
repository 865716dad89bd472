"""Per-app Tavern state and the helpers pages use to reach it.

``create_app`` stores one :class:`TavernState` in ``app.extensions["tavern"]``: the realm, its config, one
:class:`core.ledger.Ledger` (thread-safe, shared by all requests of the app) and a
:class:`core.quest_queue.QuestQueue` over it. Inside a request (or an app context)::

    from tavern.context import current_ledger, current_queue, current_realm, current_config
    rows = current_ledger().list_quests()

The Tavern never imports the training loop: it reads the ledger and writes commands into it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from core.config import RealmConfig
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from core.realm import Realm

EXTENSION_KEY = "tavern"


@dataclass
class TavernState:
    """Everything a request needs about the realm. Created once per app by ``create_app``."""

    realm: Realm
    config: RealmConfig
    ledger: Ledger
    queue: QuestQueue


def init_state(app: Flask, realm: Realm, config: RealmConfig) -> TavernState:
    """Open the realm's ledger and attach the state to ``app``. Returns it."""
    ledger = Ledger(realm.ledger_path)
    state = TavernState(realm=realm, config=config, ledger=ledger, queue=QuestQueue(realm, ledger))
    app.extensions[EXTENSION_KEY] = state
    return state


def tavern_state(app: Flask | None = None) -> TavernState:
    """The :class:`TavernState` of ``app`` (default: the current app). Raises ``RuntimeError`` outside an
    app context or when the app was not made by ``create_app``."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError("this Flask app was not created by tavern.app.create_app") from None


def current_realm() -> Realm:
    return tavern_state().realm


def current_config() -> RealmConfig:
    return tavern_state().config


def current_ledger() -> Ledger:
    """The app's one ledger connection (thread-safe; do not close it)."""
    return tavern_state().ledger


def current_queue() -> QuestQueue:
    return tavern_state().queue
