"""Starting the webhook dispatcher (:mod:`core.webhooks`) in the processes the CLI runs, with the level-up
watcher that needs the game formula (:mod:`tavern.game`, which ``core/`` may not import).

``supervise`` and ``daemon`` both call :func:`start_webhooks`; the one holding ``run/webhooks.lock``
delivers (the supervisor when it runs: it outlives daemon crashes, so ``crash`` events go out at once), the
other waits for the lock. Nothing starts when ``webhooks`` is empty.
"""

from __future__ import annotations

from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from core.webhooks import LEVEL_UP_KIND, DispatcherThread
from tavern import game

LEVEL_KEY = "webhooks/level"
"""kv: the highest level announced by a ``level_up`` event (levels never get announced twice, also when a
rollback lowers the global step and it climbs again)."""


def watch_level(ledger: Ledger) -> None:
    """Write a ``level_up`` event when the hero's level (``tavern.game.level_for_xp`` of the global step)
    exceeds the highest level announced so far. The first call only records the current level."""
    last = ledger.last_step()
    global_step = int(last["global_step"]) if last else 0
    level = game.level_for_xp(game.xp_from_global_step(global_step))
    announced = ledger.get_value(LEVEL_KEY)
    if announced is None:
        ledger.set_value(LEVEL_KEY, level)
        return
    if level > int(announced):
        title = game.title_for_level(level)
        ledger.event_with_value(LEVEL_UP_KIND, f"the hero reached level {level} ({title}) at global step "
                                f"{global_step}", LEVEL_KEY, level, new_level=level, previous_level=int(announced),
                                title=title, global_step=global_step)


def start_webhooks(realm: Realm, config: RealmConfig) -> DispatcherThread | None:
    """Start the dispatcher thread when webhooks are configured (None otherwise). Stop it with
    ``.stop()`` (one last delivery round first)."""
    if not config.webhooks:
        return None
    wants_levels = any("level_up" in hook.events for hook in config.webhooks)
    return DispatcherThread(realm, config, before_poll=watch_level if wants_levels else None).start()
