"""A follower rank of a data parallel group (:mod:`core.distributed`): ranks 1..N-1 of ``accelerate
launch --num_processes N -m training daemon``.

It runs the same :class:`core.engine.Engine` as rank 0's daemon, with a :class:`core.distributed.
FollowerLedger` (no ledger writes, no checkpoint writes, no inbox, no control channel), and does what
rank 0 orders (:meth:`core.daemon.Daemon._train` sends them): ``{"op": "train", "quest": <ledger row>,
"path": <quest file>, "verdicts": <its verdicts>, "examples_done": <cursor>, "reference": <sidecar>}``
trains that quest exactly as rank 0 does (same records, same step plan, its share of each step's rows);
``{"op": "stop"}`` ends the process (status 0). Stop decisions come from rank 0, so SIGTERM/SIGINT (the
launcher sends them to every rank at a stop) are only logged here: rank 0 stops the group warmly.
An exception ends the process with a non-zero status; the launcher then stops the other ranks and the
supervisor restarts the group from the last checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from core.config import RealmConfig
from core.distributed import FollowerLedger, Ranks
from core.engine import Engine
from core.faults import TrainingRolledBack
from core.realm import Realm
from core.records import load_verdicts, trainable_records


class Follower:
    """Rank ``ranks.rank`` (> 0) of the group; :meth:`run` returns 0 when rank 0 says stop."""

    def __init__(self, realm: Realm, config: RealmConfig, ranks: Ranks):
        self.realm, self.config, self.ranks = realm, config, ranks
        self.log = logging.getLogger(f"realm.rank{ranks.rank}")
        self.ledger = FollowerLedger()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: self.log.info(
                    "signal %d: rank 0 stops the group (warm stop)", signum))
        engine = Engine(self.realm, self.config, self.ledger, logger=self.log)  # type: ignore[arg-type]
        engine.setup()
        self.log.info("rank %d of %d ready at global step %d", self.ranks.rank, self.ranks.world_size,
                      engine.global_step)
        try:
            while True:
                order = self.ranks.receive()
                if order.get("op") == "stop":
                    self.log.info("rank %d: stop at global step %d", self.ranks.rank, engine.global_step)
                    return 0
                self._train(engine, order)
        finally:
            engine.cleanup()

    def _train(self, engine: Engine, order: dict[str, Any]) -> None:
        quest = order["quest"]
        self.ledger.quests[quest["id"]] = quest
        path, verdicts_path = Path(order["path"]), Path(order["verdicts"])
        verdicts = load_verdicts(verdicts_path)
        reference = order.get("reference")
        try:
            engine.train_quest(quest["id"], lambda: trainable_records(path, verdicts),
                               examples_done=order["examples_done"],
                               reference_path=Path(reference) if reference else None)
        except TrainingRolledBack as exc:  # every rank rolled back together (all-reduced loss)
            self.log.warning("%s", exc)
