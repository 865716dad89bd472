"""The daemon: inbox -> validated priority queue -> continuous training of the hero.

Two threads in one process:

- the **admission thread** (:class:`core.admission.Admission`) takes settled files from the inbox,
  validates them with the hero's tokenizer and moves each to ``queue/<priority>/`` or ``queue/failed/``
  with its report and per-record verdict;
- the **main thread** (this module: lifecycle, the training loop, the control channel) trains quests one
  after another (generated quests after all others) with one persistent :class:`core.engine.Engine`,
  feeding it exactly the records validation
  kept (:func:`core.records.trainable_records`, after :func:`core.records.verify_unchanged`: a file that
  changed since it was validated goes back to validation, never trains in part), and obeys the control
  channel (ledger ``commands``: pause, resume, skip, stop).

The hero loop (:class:`core.skills.loop.HeroLoop`) has three narrow hooks: ``start`` after setup,
``when_idle`` when nothing is trainable (idle generation; never with ``until_idle``) and
``after_checkpoint`` after each checkpoint save (promotion trials on the schedule). A campaign
(:class:`core.campaigns.Campaign`, with ``campaign.enabled``) is checked between quests and after each
checkpoint; its current stage's quests are trained first.
The feedback loop (:class:`core.feedback.FeedbackLoop`) writes Judge quests from the Oracle's ratings and
pairs (``poll`` between quests and optimizer steps) and scores each before and after it trains.

The daemon state (:class:`core.contract.DaemonState`) is published under :data:`core.contract.DAEMON_KEY`
by :meth:`Daemon._set_state` only; its ``updated_at`` is the heartbeat. SIGTERM/SIGINT (or the ``stop``
command) stop warmly: the state becomes ``stopping``, the current step finishes and a checkpoint is saved.

**Data parallel** (:mod:`core.distributed`, ``accelerate launch --num_processes N``): this class runs on
rank 0 only; it orders the follower ranks (:class:`core.follower.Follower`) to train each quest it trains
and to stop when it stops. When a quest's training ends on rank 0 in a way the followers may not share
(any exception but a coordinated rollback), the process ends with :class:`core.distributed.GroupOutOfSync`
after the usual bookkeeping, so the launcher stops every rank and the supervisor restarts the group.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from core.admission import Admission
from core.campaigns import Campaign
from core.checkpoint_layout import checkpoint_name
from core.config import RealmConfig
from core.contract import (
    ETA_WINDOW_STEPS,
    HEARTBEAT_INTERVAL_SECONDS,
    DaemonState,
    process_identity,
    quest_eta,
)
from core.distributed import GroupOutOfSync, Ranks, is_peer_lost
from core.engine import CheckpointSkipped, Engine
from core.faults import TrainingRolledBack
from core.feedback import FeedbackLoop
from core.formats import EVERY_FORMAT
from core.fsutil import ExclusiveLock, sha256_file
from core.ledger import CommandState, Ledger, QuestState
from core.quest_queue import QuestQueue, QuestStateError
from core.realm import DAEMON_LOCK, Realm
from core.records import (
    QuestChanged,
    VerdictsError,
    load_verdicts,
    trainable_records,
)
from core.schools.reference import ReferenceError
from core.skills.loop import HeroLoop, is_generated

log = logging.getLogger("realm.daemon")

#: Every format has a school now (:mod:`core.schools`): SFT formats, paired preferences, unpaired ratings, prompts.
TRAINABLE_FORMATS = set(EVERY_FORMAT)


class AlreadyRunning(RuntimeError):
    """Raised when another daemon holds the realm's lock."""


class CheckpointHooks(Protocol):
    """What the daemon calls around each checkpoint save (``management.hooks.CheckpointHooks``, the disk
    guard and retention, implements it; the CLI passes one in)."""

    def before_save(self, *, parameters: int | None = None, should_stop: Callable[[], bool] = ...,
                    on_wait: Callable[[Any], None] = ...) -> bool:
        """True when the checkpoint fits; may block while the disk is short (calling ``on_wait(result)``),
        and returns False when ``should_stop()`` becomes true meanwhile (the save is then skipped)."""
        ...

    def after_save(self, path: Path | None = None) -> None:
        """Called with the new checkpoint's folder (e.g. prune by the retention policy)."""
        ...


class Daemon:
    """One realm's long-running trainer. ``run()`` returns when stopped (or idle, with ``until_idle``)."""

    def __init__(self, realm: Realm, config: RealmConfig, *, until_idle: bool = False,
                 checkpoint_hooks: CheckpointHooks | None = None):
        """``checkpoint_hooks``: see :class:`CheckpointHooks` (passed in by the CLI), or None."""
        self.realm = realm
        self.checkpoint_hooks = checkpoint_hooks
        self.config = config
        self.until_idle = until_idle
        self.ledger: Ledger | None = None
        self.queue: QuestQueue | None = None
        self.engine = None
        self.state = DaemonState.STARTING
        self.paused = False
        self._stop = threading.Event()
        self._skip = False
        self._instance_lock = ExclusiveLock(realm.lock_file(DAEMON_LOCK))
        self._status: dict[str, Any] = {}
        self._last_heartbeat = 0.0
        self.admission: Admission | None = None
        self.hero_loop: HeroLoop | None = None
        self.campaign: Campaign | None = None
        self.feedback: FeedbackLoop | None = None
        self._identity = process_identity()  # pid and its start time: readers tell a reused pid
        self.ranks = Ranks.from_env()  # rank 0 of a data parallel group, or a group of one
        self._followers_busy = self.ranks.distributed  # True until setup and while they train a quest

    # lifecycle -------------------------------------------------------------------
    def run(self) -> int:
        """Set up, train until stopped (or idle), clean up. Returns a process exit code (0 = ok)."""
        self._acquire_lock()
        try:
            self._install_signal_handlers()
            self.setup()
            self._loop()
            return 0
        finally:
            self.cleanup()

    def setup(self) -> None:
        self.realm.ensure_layout()
        self.ledger = Ledger(self.realm.ledger_path)
        self.queue = QuestQueue(self.realm, self.ledger)
        self._set_state(DaemonState.STARTING)
        for note in self.queue.reconcile():
            log.warning(note)
        hooks = self.checkpoint_hooks
        self.engine = Engine(self.realm, self.config, self.ledger, logger=log,
                             before_save=self._before_save if hooks is not None else None,
                             after_save=self._after_save)
        completed = self._completed_steps()
        self.engine.setup()
        self._reopen_lost_quests(completed)
        self.hero_loop = HeroLoop(self.realm, self.config, self.ledger, logger=log)
        if self.config.campaign.enabled:
            self.campaign = Campaign(self.config.campaign, self.ledger, self.config.hero.name, self.realm.inbox)
            self.campaign.start(self.engine.global_step)
            self.hero_loop.campaign = self.campaign
        self.hero_loop.start(self.engine.global_step)
        self.feedback = FeedbackLoop(self.realm, self.config, self.ledger, logger=log)
        self.feedback.start()
        hero = self.engine.hero_info
        self._status["hero"] = hero
        if hero.get("newborn"):
            msg = (f"training a newborn hero ({hero.get('architecture')}, {hero.get('parameters'):,} parameters, "
                   "random init). Set hero.base_model in config.json to a Hugging Face model folder or "
                   "cached hub id to train a real model.")
            log.warning(msg)
            self.ledger.event("newborn_hero", msg, level="warning")
        self.ledger.event("daemon_started", f"daemon started at global step {self.engine.global_step}",
                          pid=os.getpid(), global_step=self.engine.global_step)
        self.admission = Admission(self.realm, self.config, self.ledger, self.queue, self.engine.tokenizer)
        self.admission.start()
        self._followers_busy = False  # they finished their setup with the engine's (same collectives)

    def _before_save(self) -> bool:
        """The disk guard: True when the checkpoint fits; while the disk is short it waits (state paused,
        heartbeat kept), and returns False if a stop is requested meanwhile."""
        assert self.engine is not None
        return self.checkpoint_hooks.before_save(
            parameters=self.engine.hero_info.get("trainable_parameters"), should_stop=self._stop.is_set,
            on_wait=lambda result: self._set_state(DaemonState.PAUSED, disk_full=getattr(result, "message", "")))

    def _after_save(self, path: Path) -> None:
        """After each checkpoint save: the CLI's hooks (retention), then the trials that are due (not while
        stopping: a stop is not delayed by a trial)."""
        if self.checkpoint_hooks is not None:
            self.checkpoint_hooks.after_save(path)
        if self.hero_loop is not None and self.engine is not None and not self._stop.is_set():
            engine = self.engine
            self.hero_loop.after_checkpoint(engine.accelerator.unwrap_model(engine.model), engine.tokenizer,
                                            engine.global_step, path, on_progress=self._heartbeat)
        if self.campaign is not None and self.engine is not None:
            self.campaign.check(self.engine.global_step, force=True)

    def cleanup(self) -> None:
        self._stop.set()
        if self.ledger is not None:
            self._set_state(DaemonState.STOPPING)
        if self.admission is not None:
            self.admission.stop()
            self.admission.join(timeout=30)
        if self.engine is not None:
            try:
                if self.engine.global_step > self.engine.last_saved_step:
                    self.engine.save_checkpoint("stop")
            except CheckpointSkipped as exc:
                log.error("%s: the steps after %s will be trained again at the next start", exc,
                          checkpoint_name(self.engine.last_saved_step))
            finally:
                self._stop_followers()
                self.engine.cleanup()
        if self.ledger is not None:
            self._set_state(DaemonState.STOPPED)
            self.ledger.event("daemon_stopped", "daemon stopped",
                              global_step=self.engine.global_step if self.engine else None)
            self.ledger.close()
        self._release_lock()

    def _stop_followers(self) -> None:
        """Order the follower ranks to stop -- when they wait for an order; otherwise they are in the
        middle of a quest rank 0 left (it exits non-zero) and the launcher stops them."""
        if not self.ranks.distributed or self._followers_busy:
            return
        try:
            self.ranks.send({"op": "stop"})
        except RuntimeError as exc:  # a rank is gone already
            log.warning("could not tell the other ranks to stop: %s", exc)

    def _order_followers(self, quest: dict[str, Any], reference: Path | None) -> None:
        """Tell the follower ranks to train ``quest`` from its cursor as this rank does now."""
        if not self.ranks.distributed:
            return
        assert self.queue is not None
        self._followers_busy = True
        self.ranks.send({"op": "train", "quest": dict(quest), "path": str(self.queue.path_of(quest)),
                         "verdicts": str(self.queue.verdicts_path_of(quest)),
                         "examples_done": quest["examples_trained"] or 0,
                         "reference": str(reference) if reference is not None else None})

    def _group_out_of_sync(self, exc: BaseException) -> None:
        """After a quest's training ended on this rank alone: in a group, end the process (see the module doc)."""
        if self.ranks.distributed:
            raise GroupOutOfSync(f"rank 0 left quest training ({type(exc).__name__}: {exc}); the group "
                                 "restarts from the last checkpoint") from exc

    def request_stop(self) -> None:
        self._stop.set()
        if self.admission is not None:
            self.admission.stop()

    # main loop --------------------------------------------------------------------
    def _loop(self) -> None:
        assert self.queue is not None
        while not self._stop.is_set():
            self._handle_commands()
            if self._stop.is_set():
                break
            if self.admission is not None and self.admission.error is not None:
                raise RuntimeError("admission thread died") from self.admission.error
            if self.paused:
                self._set_state(DaemonState.PAUSED)
                self._stop.wait(0.2)
                continue
            if self.campaign is not None and self.engine is not None:
                self.campaign.check(self.engine.global_step)
            if self.feedback is not None:
                self.feedback.poll()
            quest = self.queue.next_trainable(TRAINABLE_FORMATS, last=is_generated,
                                              first=self._stage_quest if self.campaign else None)
            if quest is None:
                # re-checked after: a validation may have queued a quest since next_trainable() looked
                idle = self.admission is not None and self.admission.idle() \
                    and self.queue.next_trainable(TRAINABLE_FORMATS) is None
                if self.until_idle and idle:
                    log.info("nothing trainable left: exiting (--until-idle)")
                    break
                if idle and not self.until_idle and self.hero_loop is not None:
                    self.hero_loop.when_idle()
                self._set_state(DaemonState.IDLE, quest_id=None)
                self._stop.wait(0.1)
                continue
            self._train(quest)

    def _stage_quest(self, quest: dict[str, Any]) -> bool:
        """The campaign stage's quests train first -- except generated ones, which stay last."""
        return self.campaign is not None and self.campaign.is_stage_quest(quest) and not is_generated(quest)

    def _train(self, quest: dict[str, Any]) -> None:
        assert self.queue is not None and self.ledger is not None and self.engine is not None
        qid = quest["id"]
        starting = quest["state"] == QuestState.QUEUED.value
        if starting:
            try:
                quest = self.queue.transition(qid, QuestState.PROCESSING, expect=QuestState.QUEUED, deferred=0)
            except QuestStateError as exc:  # removed or re-prioritised from the Tavern meanwhile
                log.info("quest %s changed before it started: %s", qid, exc)
                return
        records = self._verified_records(quest)
        if records is None:
            return
        if starting:
            self.ledger.event("quest_started", f"quest {quest['name']} started", quest_id=qid)
            if self.feedback is not None:
                self.feedback.quest_starting(quest, self.engine)
        else:
            self.ledger.event("quest_resumed", f"quest {quest['name']} resumed at example "
                              f"{quest['examples_trained']}", quest_id=qid)
        self._skip = False
        self._set_state(DaemonState.TRAINING, quest_id=qid)
        completed = self._completed_steps()
        reference = self.queue.reference_path_of(quest)
        self._order_followers(quest, reference)
        try:
            result = self.engine.train_quest(qid, records, examples_done=quest["examples_trained"] or 0,
                                             should_stop=self._should_interrupt, reference_path=reference)
        except TrainingRolledBack as exc:  # non-finite losses: the engine is back at its last checkpoint
            log.error("%s; quest %s resumes from the ledger's cursor", exc, qid)
            self._followers_busy = False  # every rank rolled back at the same step
            self._status["hero"] = self.engine.hero_info
            self._reopen_lost_quests(completed)
            return  # still processing: the loop resumes it at examples_trained (rolled back)
        except CheckpointSkipped as exc:  # disk full and a stop was requested: not the quest's fault
            log.error("%s; quest %s stays in processing", exc, qid)
            self._group_out_of_sync(exc)
            return
        except QuestChanged as exc:  # its file changed while it trained
            self._file_changed(self.ledger.get_quest(qid) or quest, str(exc))
            self._group_out_of_sync(exc)
            return
        except ReferenceError as exc:  # a started quest lost its reference log-probs: no retry can help
            self.queue.transition(qid, QuestState.FAILED, error=str(exc))
            self.ledger.event("quest_failed", f"quest {quest['name']} failed: {exc}", level="error", quest_id=qid)
            self._group_out_of_sync(exc)
            return
        except Exception as exc:  # a failing quest must not kill the daemon
            if not (self.ranks.distributed and is_peer_lost(exc)):  # a lost rank is not the quest's fault
                self._quest_raised(quest, exc)
            self._group_out_of_sync(exc)
            return
        self._followers_busy = False
        if result.status == "completed":
            self.queue.transition(qid, QuestState.COMPLETED, expect=QuestState.PROCESSING,
                                  examples_total=result.examples_total)
            self.ledger.event("quest_completed", f"quest {quest['name']} completed: "
                              f"{result.examples_trained} examples in {result.steps} steps", quest_id=qid,
                              global_step=self.engine.global_step)
            if self.feedback is not None:
                self.feedback.quest_completed(quest, self.engine)
            return
        # interrupted: stop, or skip
        if self.engine.global_step > self.engine.last_saved_step:
            try:
                self.engine.save_checkpoint("skip" if self._skip else "stop")
            except CheckpointSkipped as exc:
                log.error("%s; quest %s stays in processing", exc, qid)
                return
        if self._skip:
            self.queue.transition(qid, QuestState.QUEUED, expect=QuestState.PROCESSING, deferred=1)
            self.ledger.event("quest_skipped", f"quest {quest['name']} went back to the queue at example "
                              f"{result.examples_trained}", quest_id=qid)
            self._skip = False

    def _completed_steps(self) -> dict[int, int]:
        """``{quest id: last global step}`` of the completed quests that trained steps."""
        assert self.ledger is not None
        rows = self.ledger.query("SELECT id, last_global_step FROM quests WHERE state=? AND last_global_step "
                                 "IS NOT NULL", (QuestState.COMPLETED.value,))
        return {r["id"]: r["last_global_step"] for r in rows}

    def _reopen_lost_quests(self, completed: dict[int, int]) -> None:
        """Queue again the quests of ``completed`` whose last steps are newer than the weights the engine
        now holds (a corrupt latest checkpoint fell back to an older one): a quest is never left completed
        with steps its hero lost. They resume at their rolled-back ``examples_trained``."""
        assert self.queue is not None and self.ledger is not None and self.engine is not None
        step = self.engine.global_step
        for qid, last in completed.items():
            if last <= step:
                continue
            try:
                quest = self.queue.transition(qid, QuestState.QUEUED, expect=QuestState.COMPLETED,
                                              note=f"reopened: its steps after global step {step} were lost "
                                              "with their checkpoint")
            except (OSError, QuestStateError) as exc:  # its file was removed meanwhile
                self.ledger.event("quest_lost", f"quest {qid} completed at global step {last} but the hero was "
                                  f"rolled back to global step {step}, and it cannot be queued again ({exc})",
                                  level="error", quest_id=qid)
                continue
            self.ledger.event("quest_reopened", f"quest {quest['name']} completed at global step {last} but the "
                              f"hero was rolled back to global step {step}: queued again, it resumes at "
                              f"example {quest['examples_trained']}", level="error", quest_id=qid)

    def _quest_raised(self, quest: dict[str, Any], exc: Exception) -> None:
        assert self.queue is not None and self.ledger is not None
        attempts = (quest["attempts"] or 0) + 1
        error = f"{type(exc).__name__}: {exc}"
        log.exception("quest %s raised (attempt %d of %d)", quest["id"], attempts,
                      self.config.training.max_attempts)
        if attempts >= self.config.training.max_attempts:
            self.queue.transition(quest["id"], QuestState.FAILED, attempts=attempts, error=error)
            self.ledger.event("quest_failed", f"quest {quest['name']} failed after {attempts} attempts: {error}",
                              level="error", quest_id=quest["id"])
        else:
            self.queue.transition(quest["id"], QuestState.QUEUED, attempts=attempts, error=error)
            self.ledger.event("quest_retry", f"quest {quest['name']} raised ({error}); retry "
                              f"{attempts + 1} of {self.config.training.max_attempts}", level="warning",
                              quest_id=quest["id"])

    def _verified_records(self, quest: dict[str, Any]) -> Callable[[], Iterator[tuple[int, dict]]] | None:
        """A function returning the quest's records exactly as validation kept them
        (:func:`core.records.trainable_records`; called again for each unshuffled epoch), after checking
        that its file is the one validated (SHA-256). None when it is not, or when its verdict is missing
        (a quest queued before verdicts existed): it goes back to validation."""
        assert self.queue is not None
        path = self.queue.path_of(quest)
        try:
            verdicts = load_verdicts(self.queue.verdicts_path_of(quest))
        except VerdictsError as exc:
            verdicts, problem = None, str(exc)
        validated = verdicts.content_hash if verdicts is not None else quest["content_hash"]
        try:
            digest = sha256_file(path)
        except OSError as exc:  # counted as a failed attempt, like any quest that raises
            self._quest_raised(quest, exc)
            return None
        if digest != validated:
            self._file_changed(quest, f"{quest['name']} changed after it was validated (SHA-256 {digest[:12]}..., "
                               f"validated {str(validated)[:12]}...)")
            return None
        if verdicts is None:
            self._validate_again(quest, f"the record verdicts of {quest['name']} cannot be used ({problem})",
                                 kind="quest_verdicts_missing")
            return None
        return lambda: trainable_records(path, verdicts)

    def _file_changed(self, quest: dict[str, Any], why: str) -> None:
        """A quest's file is not what validation read: validate it again -- unless examples of it were
        trained already (they came from the validated content; the rest cannot be trained in part):
        then it fails, and the file can be dropped again as a new quest."""
        assert self.queue is not None and self.ledger is not None
        done = quest["examples_trained"] or 0
        if done == 0:
            self._validate_again(quest, why)
            return
        error = (f"{why}, after {done} of its examples were trained: the rest is not trained from a file "
                 "that differs from the one validated; drop the file into the inbox again as a new quest")
        self.queue.transition(quest["id"], QuestState.FAILED, error=error)
        self.ledger.event("quest_changed", error, level="error", quest_id=quest["id"])

    def _validate_again(self, quest: dict[str, Any], why: str, kind: str = "quest_changed") -> None:
        assert self.queue is not None and self.ledger is not None and self.admission is not None
        try:
            self.queue.transition(quest["id"], QuestState.VALIDATING, expect=QuestState(quest["state"]))
        except QuestStateError as exc:  # removed or re-prioritised from the Tavern meanwhile
            log.info("quest %s changed before it was validated again: %s", quest["id"], exc)
            return
        self.ledger.event(kind, f"{why}: validated again before it trains", level="warning",
                          quest_id=quest["id"])
        self.admission.request_validation(quest["id"])

    def _should_interrupt(self) -> bool:
        """Called by the engine between optimizer steps: handle commands, honour pause, report progress."""
        self._handle_commands()
        if self.feedback is not None:
            self.feedback.poll()
        while self.paused and not self._stop.is_set() and not self._skip:
            self._set_state(DaemonState.PAUSED)
            self._stop.wait(0.2)
            self._handle_commands()
        if self._stop.is_set():
            self._set_state(DaemonState.STOPPING)  # the quest's checkpoint comes next: no hang verdict
        elif self.state == DaemonState.PAUSED:
            self._set_state(DaemonState.TRAINING)
        self._heartbeat()
        return self._stop.is_set() or self._skip

    # control channel ------------------------------------------------------------------
    def _handle_commands(self) -> None:
        assert self.ledger is not None
        for cmd in self.ledger.pending_commands():
            name = cmd["command"]
            if name == "pause":
                self.paused = True
                result = "paused"
            elif name == "resume":
                self.paused = False
                result = "resumed"
            elif name == "skip":
                if self.state in (DaemonState.TRAINING, DaemonState.PAUSED):
                    self._skip = True
                    result = "skipping the current quest"
                else:
                    result = "no quest is training"
            elif name == "stop":
                self.request_stop()
                result = "stopping after a checkpoint"
            else:
                self.ledger.finish_command(cmd["id"], CommandState.FAILED, f"unknown command {name!r}")
                continue
            self.ledger.finish_command(cmd["id"], CommandState.DONE, result)
            self.ledger.event(f"command_{name}", result)

    # state and heartbeat ------------------------------------------------------------------
    def _set_state(self, state: DaemonState, **fields: Any) -> None:
        """The one place that changes the daemon state (written to the ledger key ``daemon``)."""
        changed = state != self.state
        self.state = state
        self._status.update(fields)
        if changed or time.monotonic() - self._last_heartbeat >= HEARTBEAT_INTERVAL_SECONDS:
            self._heartbeat(force=True)
            if changed:
                log.info("daemon %s", state.value)

    def _heartbeat(self, force: bool = False) -> None:
        if self.ledger is None:
            return
        if not force and time.monotonic() - self._last_heartbeat < HEARTBEAT_INTERVAL_SECONDS:
            return
        self._last_heartbeat = time.monotonic()
        status = {"state": self.state.value, **self._identity, "quest_id": self._status.get("quest_id"),
                  "hero": self._status.get("hero"), "paused": self.paused,
                  "trainable_formats": sorted(TRAINABLE_FORMATS)}
        if self.engine is not None:
            status.update(self._progress())
        self.ledger.publish_daemon_status(status)

    def _progress(self) -> dict[str, Any]:
        """global_step, tokens/s and the current quest's ETA (seconds) from the last steps' metrics."""
        assert self.ledger is not None and self.engine is not None
        out: dict[str, Any] = {"global_step": self.engine.global_step, "tokens_per_second": None,
                               "eta_seconds": None, "last_checkpoint": self._status.get("last_checkpoint")}
        last = self.ledger.last_step()
        if last:
            out["tokens_per_second"] = last["tokens_per_second"]
            qid = self._status.get("quest_id")
            quest = self.ledger.get_quest(qid) if qid else None
            if quest:
                out["eta_seconds"] = quest_eta(self.ledger.recent_steps(ETA_WINDOW_STEPS, quest_id=qid),
                                               quest["examples_total"], quest["examples_trained"]).eta_seconds
        latest = self.engine.latest_checkpoint_info()
        if latest is not None:
            out["last_checkpoint"] = latest
        return out

    # single instance ----------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        if not self._instance_lock.acquire():
            raise AlreadyRunning(f"another daemon is running on the realm {self.realm.root}")
        os.ftruncate(self._instance_lock.fd, 0)
        os.write(self._instance_lock.fd, str(os.getpid()).encode())

    def _release_lock(self) -> None:
        self._instance_lock.release()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop())
