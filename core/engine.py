"""The continuous trainer: one hero, one never-resetting ``global_step``, across quests and restarts.

Lifecycle (torchtune/litgpt style)::

    engine = Engine(realm, config, ledger)
    engine.setup()                      # weights, optimizer, scheduler, RNG, global_step (resume)
    result = engine.train_quest(quest_id, records, examples_done=quest["examples_trained"])
    engine.save_checkpoint("sigterm")   # when the caller stops it
    engine.cleanup()

**Resume is exact.** A quest's records stream in file order -- the records validation kept,
:func:`core.records.trainable_records` --; record ``i`` (0-based) is held out for evaluation when
``eval_holdout_every = N > 0`` and ``i % N == N - 1`` (:func:`core.records.is_held_out`; the first
``eval_max_examples`` of them form the eval set, the records ``python -m training eval --every N``
reads); the others are the quest's *train examples* 0, 1, 2, ... Each optimizer step
takes the next train examples, packed into ``micro_batch_size`` x ``gradient_accumulation_steps`` rows
(:func:`core.packing.iter_steps`), so step boundaries depend only on where the cursor starts. Each step's
examples ``[example_start, example_end)`` and line numbers go to the ledger with its metrics, in one
transaction. After a crash, :meth:`Engine.setup` loads the newest loadable checkpoint (global step S) and
rolls the ledger back to S (:meth:`core.ledger.Ledger.rollback_to`), so the quest's ``examples_trained``
is again the cursor of the weights; training restarts from there with the same optimizer, scheduler and
RNG state: no example is replayed or skipped. The checkpoint's cursor also records the quest's
``eval_holdout_every``, ``epochs`` and ``shuffle``, kept for that quest when the config changes before it is
resumed from that cursor.

**Epochs and order** (:mod:`core.epochs`): a quest whose ``schools`` rule has ``epochs = E`` has a cursor
over ``E x`` its train examples; each epoch is in file order or, with ``shuffle``, in a permutation seeded
by the quest's content SHA-256 and the epoch -- a pure function of the cursor, so resume stays exact.

**Schools** (:mod:`core.schools`). The quest's school turns its records into items and steps and gives
the loss and metrics; the engine keeps everything else (optimizer, scheduler, ``global_step``, RNG,
cursor, checkpoints, faults, resume). A school's summed loss is divided by its step denominator (SFT:
trainable tokens; preferences: pairs or records); its metrics go to the ledger with the step. Schools
with a reference model get its log-probs once per quest (:mod:`core.schools.reference`).

**Loss** (Scribe, SFT). Summed token cross-entropy over the whole optimizer step divided by the step's trainable
tokens (exact gradient accumulation). A step whose loss or gradient norm is not finite, or that has no
trainable token, is skipped: no optimizer update, ``global_step`` not incremented, no step row, a
warning event; its examples count as consumed (the cursor moves on).

**Faults** (:mod:`core.faults`). After ``training.max_nonfinite_steps`` non-finite steps in a row the
engine rolls back to the last good checkpoint with a lower learning rate and raises
:class:`core.faults.TrainingRolledBack` (restart the quest from the ledger's cursor). A CUDA
out-of-memory error halves the micro-batch (doubling accumulation: the step's rows and tokens are
unchanged) and retries the step; on CUDA each quest starts with a probe step on a full micro-batch of
``max_length`` rows (the longest batch any step can have), so an OOM shows at once, not hours later.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core import adapters, memory, schools, trackers
from core import checkpoint as ckpt
from core.chat import TokenizedExample, count_tokens
from core.config import ConfigError, RealmConfig, quest_rule_for
from core.config_diff import config_changes, format_changes
from core.distributed import Ranks, collate_local, forward_backward, sharded_backend_problem
from core.epochs import ordered_examples
from core.faults import NonFiniteLossError, TrainingRolledBack, free_memory, load_lr_scale, store_lr_scale
from core.hero import NEWBORN_HINT, describe_model, load_tokenizer
from core.ledger import Ledger
from core.packing import (
    PACKED_SDPA,
    Batch,
    collate,
    collate_flat,
    micro_batches,
    model_attention_mask,
    pack_rows,
    register_packed_sdpa,
)
from core.realm import Realm
from core.records import count_train_examples, is_held_out  # noqa: F401 - re-exported
from core.schools import reference
from core.schools.base import School

EVAL_READAHEAD_RECORDS = 20_000
"""Records read ahead (kept as raw dicts) to fill the eval set before training a quest."""


def resolve_mixed_precision(setting: str) -> str:
    """``training.mixed_precision`` -> accelerate's ``"no" | "bf16" | "fp16"``: ``auto`` is bf16 on a CUDA
    GPU supporting it, else fp32; bf16/fp16 without a CUDA GPU fall back to fp32 (CPU half precision is
    ~100x slower, see ../shared/MEASURED.md)."""
    cuda = torch.cuda.is_available()
    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting in ("bf16", "fp16") and not cuda:
        return "no"
    return setting


@dataclass
class QuestResult:
    """What :meth:`Engine.train_quest` did. ``examples_trained``: the quest's cursor (train examples
    consumed in total, including before a resume); ``steps``: optimizer steps of this call;
    ``quest_steps``: of the whole quest; ``loss``: last step's loss; ``eval_loss``: last evaluation;
    ``examples_total``: the quest's train examples (held-out excluded), None when interrupted before
    the end of the records was read."""

    status: str  # "completed" | "interrupted"
    quest_id: int
    examples_trained: int
    steps: int
    quest_steps: int
    global_step: int
    loss: float | None = None
    eval_loss: float | None = None
    eval_examples: int = 0
    checkpoint: str | None = None
    examples_total: int | None = None


class _HoldoutSplit:
    """Splits a record stream into the eval set and the indexed train examples, reading ahead so the
    eval set is complete before training (up to ``readahead`` buffered records)."""

    def __init__(self, records: Iterable[tuple[int, dict]], every: int, cap: int, readahead: int):
        self._it = iter(records)
        self._every, self._cap, self._readahead = every, cap, readahead
        self._buffer: deque[tuple[int, int, dict]] = deque()
        self.eval_records: list[tuple[int, dict]] = []
        self._record_index = 0
        self._train_index = 0
        self._done = False

    @property
    def train_total(self) -> int | None:
        """Train examples in the whole stream, once it has been read to the end."""
        return self._train_index if self._done else None

    def _pull(self) -> None:
        try:
            line, example = next(self._it)
        except StopIteration:
            self._done = True
            return
        if is_held_out(self._record_index, self._every):
            if len(self.eval_records) < self._cap:
                self.eval_records.append((line, example))
        else:
            self._buffer.append((self._train_index, line, example))
            self._train_index += 1
        self._record_index += 1

    def read_ahead(self) -> None:
        while (self._every > 0 and not self._done and len(self.eval_records) < self._cap
               and len(self._buffer) < self._readahead):
            self._pull()

    def train_examples(self) -> Iterator[tuple[int, int, dict]]:
        """``(train index, line, example)`` in order."""
        while True:
            if self._buffer:
                yield self._buffer.popleft()
            elif self._done:
                return
            else:
                self._pull()


class CheckpointSkipped(RuntimeError):
    """A checkpoint was not written: the disk guard found no room and a stop was requested."""


class Engine:
    """The continuous trainer of one realm's hero, whatever the quest's school (see the module doc).

    After :meth:`setup`: ``global_step`` (int, never reset), ``model`` (accelerate-prepared), ``tokenizer``,
    ``hero_info`` {name, base_model, architecture, parameters, newborn, checkpoint}, ``cursor`` (of the
    current weights: {quest_id, examples_done, quest_done, eval_holdout_every}), ``resume_cursor`` (the
    loaded checkpoint's), ``last_saved_step``, ``last_checkpoint``, ``mixed_precision`` (no|bf16|fp16).
    """

    def __init__(self, realm: Realm, config: RealmConfig, ledger: Ledger, logger: logging.Logger | None = None,
                 *, before_save: Callable[[], bool] | None = None,
                 after_save: Callable[[Path], None] | None = None):
        self.realm, self.config, self.ledger = realm, config, ledger
        # checkpoint hooks (the disk guard and retention of management/, passed in by the CLI):
        # before_save() -> False means "no room and a stop was requested": the save is skipped
        self.before_save, self.after_save = before_save, after_save
        self.log = logger or logging.getLogger("core.engine")
        self.checkpoints_dir = realm.checkpoints_dir(config.hero.name)
        self.global_step = 0
        self.model = self._raw_model = self.tokenizer = self.optimizer = self.scheduler = self.accelerator = None
        self.mixed_precision = "no"
        self.hero_info: dict[str, Any] = {}
        self.adapter: dict[str, Any] | None = None  # the checkpoints' adapter record (core.adapters), None: full
        self.cursor: dict[str, Any] | None = None  # where the current weights are in the data
        self.resume_cursor: dict[str, Any] | None = None  # the cursor of the checkpoint loaded at setup
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.last_saved_step = 0  # global step of the checkpoint last saved or loaded (0: none)
        self._last_save = time.monotonic()
        # faults (core.faults): rows per forward pass (halved on CUDA OOM), non-finite steps in a row,
        # rollbacks without a good step since, learning-rate scale (kept in the ledger), memory probe
        # at each quest's start (None: on CUDA only)
        self.micro_batch_size = config.training.micro_batch_size
        self.nonfinite_streak = 0
        self.rollbacks_in_a_row = 0
        self.lr_scale = 1.0
        self.probe_memory: bool | None = None
        # data parallel ranks (core.distributed): rank 0 alone writes the ledger and checkpoints
        self.ranks = Ranks.from_env()

    # --- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the hero and the trainer state. Raises :class:`core.hero.HeroError` when no source loads."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no tqdm bars for every save/load in the daemon's log
        t, hero = self.config.training, self.config.hero
        for note in ckpt.clean_incomplete(self.checkpoints_dir) if self.ranks.is_main else ():
            self.ledger.event("checkpoint_cleanup", note, level="warning")
        self.mixed_precision = resolve_mixed_precision(t.mixed_precision)
        if self.mixed_precision == "no" and t.mixed_precision in ("bf16", "fp16"):
            self._warn("precision_fallback", f"mixed_precision={t.mixed_precision} needs a CUDA GPU; using fp32")
        adapters.check_environment(self.config)  # e.g. QLoRA without CUDA: ConfigError before any loading
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, **self.ranks.accelerator_kwargs(),
                                       **trackers.accelerator_kwargs(self.realm, self.config))

        if problem := sharded_backend_problem(self.accelerator.distributed_type):  # launched with FSDP/DeepSpeed
            raise ConfigError("the accelerate launch", [problem])
        state, path, loaded = self._load_latest_checkpoint()
        if path is None:
            # the base (e.g. the embedded default hero, written on first use) is made by rank 0 first
            loaded = self._load_hero(None, None) if self.ranks.is_main else None
            self.ranks.barrier()
            loaded = loaded or self._load_hero(None, None)
            self.tokenizer = load_tokenizer(loaded.tokenizer_source, hero)
            set_seed(t.seed)
        else:
            ckpt_base = state.get(ckpt.KEY_HERO, {}).get("base_model")
            if ckpt_base != hero.base_model:
                self._warn("base_model_changed", f"checkpoints of hero {hero.name!r} started from {ckpt_base!r} "
                           f"but hero.base_model is {hero.base_model!r}: resuming from the checkpoint; use a new "
                           "hero.name to start over from the new base model")
            self._warn_config_changes(state.get(ckpt.KEY_CONFIG), path)
        for kind, message in loaded.notes:
            self._warn(kind, message)
        # on its device before the optimizer holds its params (core.adapters.load_for_training put it there)
        self.model, newborn, self.adapter = loaded.model, loaded.newborn, loaded.adapter
        self.model.config.use_cache = False

        self.lr_scale = self.ranks.decide(lambda: load_lr_scale(self.ledger, hero.name, t.learning_rate))
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.learning_rate * self.lr_scale, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
            fused=self.accelerator.device.type == "cuda")
        self.scheduler = self._make_scheduler()
        if state is not None:
            self.optimizer.load_state_dict(state[ckpt.KEY_OPTIMIZER])
            self.scheduler.load_state_dict(state[ckpt.KEY_SCHEDULER])
            self._apply_hyperparameters()
            ckpt.set_rng_state(state[ckpt.KEY_RNG])
            self.global_step = int(state[ckpt.KEY_GLOBAL_STEP])
            self.resume_cursor = self.cursor = state.get(ckpt.KEY_CURSOR)
            self.last_loss, self.last_eval_loss = state.get(ckpt.KEY_LOSS), state.get(ckpt.KEY_EVAL_LOSS)
            self.last_checkpoint, self.last_saved_step = path, self.global_step
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self._raw_model = self.accelerator.unwrap_model(self.model)
        self._attn = getattr(self._raw_model.config, "_attn_implementation", None)
        if self._attn == "sdpa" and self.accelerator.device.type == "cpu":
            # causal SDPA per packed document instead of a dense 4D mask (core.packing): same logits, less work
            self._raw_model.set_attn_implementation(register_packed_sdpa())
            self._attn = PACKED_SDPA
        self._mask_dtype = next(self._raw_model.parameters()).dtype

        removed = self.ledger.rollback_to(self.global_step)
        if removed:
            self._warn("rollback", f"forgot {removed} step(s) after global step {self.global_step}: their "
                       "weights were never checkpointed; those examples will be trained again", removed=removed)
        for warning in trackers.start(self.accelerator, self.config, self.global_step):  # training.report_to
            self._warn("report_to", warning)
        self.hero_info = {"name": hero.name, "base_model": hero.base_model, **describe_model(self._raw_model),
                          "adapter": t.adapter, "newborn": newborn, "checkpoint": str(path) if path else None}
        where = f"checkpoint {path.name}" if path else (hero.base_model or "the embedded default hero")
        self.ledger.event("hero_loaded", f"hero {hero.name} at global step {self.global_step} from {where} "
                          f"({self.hero_info['parameters']:,} parameters, {self.accelerator.device}, "
                          f"precision {self.mixed_precision})", **self.hero_info)
        self.log.info("hero %s: global_step %d from %s, %s parameters, device %s, precision %s", hero.name,
                      self.global_step, where, f"{self.hero_info['parameters']:,}", self.accelerator.device,
                      self.mixed_precision)
        if newborn:  # the daemon records the ledger event; the log says it for any caller
            self.log.warning(NEWBORN_HINT)
        self._last_save = time.monotonic()

    def _warn_config_changes(self, saved: dict | None, path: Path) -> None:
        """Each key of the config that differs from the snapshot saved in the checkpoint resumed from
        (:func:`core.config_diff.config_changes`): a warning in the log and a ``config_changed`` event."""
        changes = config_changes(saved, self.config.model_dump()) if isinstance(saved, dict) else []
        if changes:
            self._warn("config_changed", f"config changed since checkpoint {path.name}: {format_changes(changes)}",
                       changes=[{"key": k, "old": a, "new": b} for k, a, b in changes])

    def _load_latest_checkpoint(self) -> tuple[dict | None, Path | None, adapters.LoadedHero | None]:
        """Newest checkpoint that verifies (:func:`core.checkpoint.load_trainer_state`: files whole and
        parseable), with its model and tokenizer. A broken one is quarantined with a warning event and the
        previous one tried. A verified checkpoint whose model then fails to load (out of memory, missing
        ``trust_remote_code``) raises :class:`HeroError`: the environment is at fault, not the checkpoint.
        In a group (:mod:`core.distributed`) rank 0 chooses and every rank loads the one it chose."""
        path, state = self._choose_checkpoint() if self.ranks.is_main else (None, None)
        chosen = self.ranks.share(None if path is None else str(path))
        if chosen is None:
            return None, None, None
        path = Path(chosen)
        if state is None:  # a follower
            state = ckpt.load_trainer_state(path)
        loaded = self._load_hero(path, state)
        self.tokenizer = load_tokenizer(path, self.config.hero)
        return state, path, loaded

    def _choose_checkpoint(self) -> tuple[Path | None, dict | None]:
        """The newest checkpoint that verifies and its trainer state (broken ones quarantined), or None."""
        for path in reversed(ckpt.list_checkpoints(self.checkpoints_dir)):
            try:
                state = ckpt.load_trainer_state(path)
            except ckpt.CheckpointError as exc:
                moved = ckpt.quarantine(path)
                self._warn("checkpoint_corrupt", f"checkpoint {path.name} does not load ({exc}); moved to "
                           f"{moved.name}, falling back to the previous one", path=str(moved))
                continue
            return path, state
        return None, None

    def _load_hero(self, path: Path | None, state: dict | None) -> adapters.LoadedHero:
        """The model (full, or base + adapter) from checkpoint ``path``, or from the base when None."""
        return adapters.load_for_training(self.realm, self.config, path, state, self.accelerator.device,
                                          self.mixed_precision)

    def _make_scheduler(self):
        from transformers import get_constant_schedule, get_constant_schedule_with_warmup

        t = self.config.training
        if t.lr_scheduler_type == "constant_with_warmup":
            return get_constant_schedule_with_warmup(self.optimizer, t.warmup_steps)
        return get_constant_schedule(self.optimizer)

    def _apply_hyperparameters(self) -> None:
        """After restoring optimizer/scheduler state, apply the config's current values (a changed config
        takes effect at restart); identical config -> identical values, so resume stays exact."""
        t = self.config.training
        peak = t.learning_rate * self.lr_scale  # lr_scale < 1 after non-finite rollbacks (core.faults)
        self.scheduler.base_lrs = [peak] * len(self.optimizer.param_groups)
        lrs = [base * lam(self.scheduler.last_epoch) for base, lam in
               zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True)]
        for group, lr, wd in zip(self.optimizer.param_groups, lrs, (t.weight_decay, 0.0), strict=True):
            group.update(lr=lr, initial_lr=peak, betas=(t.adam_beta1, t.adam_beta2),
                         eps=t.adam_epsilon, weight_decay=wd)
        self.scheduler._last_lr = lrs

    # --- training --------------------------------------------------------------------------------------
    def count_tokens(self, example: dict) -> tuple[int, int]:
        """``(tokens, trainable tokens)`` of a normalized example, untruncated, with the hero's tokenizer."""
        return count_tokens(example, self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the model and its batches are."""
        return self.accelerator.device

    @property
    def attn_implementation(self) -> str | None:
        """The model's attention implementation (:data:`core.packing.PACKED_SDPA` on the CPU)."""
        return self._attn

    def logits(self, batch: Batch) -> torch.Tensor:
        """The model's logits ``(B, L, V)`` for a batch already on :attr:`device` (a school's forward pass:
        segmented attention or the 4D mask, as the engine's own)."""
        b = batch
        if self._attn == PACKED_SDPA:
            extra = {"attention_mask": None, "packed_segments": b.segments}
        else:
            extra = {"attention_mask": model_attention_mask(b.attention_mask, self._attn, self._mask_dtype)}
        return self.model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **extra).logits

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        """Summed next-token cross-entropy (fp32 scalar) over the batch's trainable tokens."""
        b = batch.to(self.accelerator.device)
        if self._attn == PACKED_SDPA:
            extra = {"attention_mask": None, "packed_segments": b.segments}
        else:
            extra = {"attention_mask": model_attention_mask(b.attention_mask, self._attn, self._mask_dtype)}
        logits = self.model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **extra).logits
        # labels shifted left (the last position predicts nothing): no copy of the logits for the shift
        targets = F.pad(b.labels[:, 1:], (0, 1), value=-100)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def _collate(self, rows: list[list[TokenizedExample]]) -> Batch:
        """A micro-batch for :meth:`_loss_sum`: with segmented attention (CPU) the rows' examples end to end
        without padding (:func:`core.packing.collate_flat`: no compute on pads), else padded rows with the
        4D mask (:func:`core.packing.collate`)."""
        if self._attn == PACKED_SDPA:
            return collate_flat(rows)
        return collate(rows, self.tokenizer.pad_token_id, self._pad_to())

    def _pad_to(self) -> int | None:
        return self.config.training.max_length if self.config.training.packing else None

    def train_quest(self, quest_id: int,
                    records: Iterable[tuple[int, dict]] | Callable[[], Iterable[tuple[int, dict]]], *,
                    examples_done: int = 0, should_stop: Callable[[], bool] = lambda: False,
                    reference_path: Path | None = None) -> QuestResult:
        """Train one quest from its cursor to its end (see the module doc for the exact semantics).

        ``records``: ``(record number, normalized example)`` in file order, the records validation kept
        (:func:`core.records.trainable_records`; the whole quest, also when resuming: held-out records are
        picked by position) -- or a function returning that stream anew, needed for a quest with more than
        one unshuffled epoch (``schools.<glob>``, :class:`core.config.QuestRule`: each epoch reads it
        again). The cursor runs over ``epochs x`` train examples in the order of :mod:`core.epochs`
        (shuffled per epoch when the rule says so). ``examples_done``: the cursor already consumed (the
        ledger's ``examples_trained``). ``should_stop`` is called before each
        optimizer step; when it returns True the call returns ``status="interrupted"`` without saving.
        At the end: evaluation, a checkpoint with ``quest_done=True``, ``status="completed"``.

        Raises :class:`core.faults.TrainingRolledBack` after rolling back to the last good checkpoint
        (non-finite losses, see :mod:`core.faults`): call again with the ledger's ``examples_trained``;
        :class:`core.faults.NonFiniteLossError` when rollbacks do not help; ``torch.OutOfMemoryError`` when
        even one row per forward pass does not fit.

        The quest's school (:func:`core.schools.make_school`; the ledger's ``quests.school``, else by its
        name and format) turns records into steps and losses. ``reference_path``: where a school that needs
        a reference model keeps the quest's reference log-probs (:mod:`core.schools.reference`; the daemon
        passes the sidecar beside the quest's file; None keeps them in memory only, no exact resume).
        Raises :class:`core.schools.reference.ReferenceError` when a started quest's reference is missing.
        """
        quest = self.ledger.get_quest(quest_id)
        school = self.school_of(quest)
        try:
            return self._run_quest(quest_id, quest, school, records, examples_done, should_stop, reference_path)
        finally:
            school.end_quest()

    def _run_quest(self, quest_id: int, quest: dict | None, school: School, records, examples_done: int,
                   should_stop: Callable[[], bool], reference_path: Path | None) -> QuestResult:
        """The body of :meth:`train_quest`, with the quest's ledger row and school."""
        t = self.config.training
        base_steps = int(quest["steps"]) if quest else 0
        every = self._holdout_every(quest_id)
        epochs, shuffle = self._quest_order(quest_id, quest)
        factory = records if callable(records) else None
        if epochs > 1 and not shuffle and factory is None:
            raise ValueError("a quest with several unshuffled epochs needs records as a function returning "
                             "the stream anew")
        split = _HoldoutSplit(factory() if factory else records, every, t.eval_max_examples,  # type: ignore[arg-type]
                              EVAL_READAHEAD_RECORDS)
        split.read_ahead()
        shuffle_key = str(quest["content_hash"]) if shuffle and quest else None
        rows_per_step = t.micro_batch_size * t.gradient_accumulation_steps

        def encode(line: int, ex: dict):
            return school.encode(ex, self.tokenizer, t.max_length, line)

        def in_order(start: int):
            return ordered_examples(split.train_examples(),
                                    lambda: _HoldoutSplit(factory(), every, 0, 0).train_examples(),  # type: ignore[misc]
                                    epochs, shuffle_key, start)

        eval_set: list = []
        if school.needs_reference:  # the whole quest is read now: its reference is computed over all of it
            items = [encode(line, ex) for _, line, ex in in_order(0)]  # every cursor position, all epochs
            eval_set.extend(encode(line, ex) for line, ex in split.eval_records)
            rows_per_step = self._prepare_reference(school, quest_id, items, eval_set, reference_path,
                                                    rows_per_step, examples_done)
            train: Iterable = iter(items[examples_done:])
        else:
            train = (encode(line, ex) for _, line, ex in in_order(examples_done))
        school.begin_quest(self, quest_id, reference_path, examples_done)
        cursor, steps, evaluated_at = examples_done, 0, None
        self.cursor = {ckpt.KEY_QUEST_ID: quest_id, ckpt.KEY_EXAMPLES_DONE: cursor, ckpt.KEY_QUEST_DONE: False,
                       ckpt.KEY_HOLDOUT_EVERY: every, ckpt.KEY_EPOCHS: epochs, ckpt.KEY_SHUFFLE: shuffle}

        def run_eval() -> None:
            nonlocal evaluated_at
            eval_set.extend(encode(line, ex) for line, ex in split.eval_records[len(eval_set):])
            if eval_set and evaluated_at != self.global_step:
                self.last_eval_loss = school.evaluate(self, eval_set)
                evaluated_at = self.global_step
                if math.isfinite(self.last_eval_loss):
                    self.ledger.record_eval(self.global_step, quest_id, self.last_eval_loss, len(eval_set))
                    trackers.log(self.accelerator, {"eval_loss": self.last_eval_loss}, self.global_step)

        def result(status: str) -> QuestResult:
            return QuestResult(status, quest_id, cursor, steps, base_steps + steps, self.global_step,
                               self.last_loss, self.last_eval_loss, len(eval_set),
                               str(self.last_checkpoint) if self.last_checkpoint else None,
                               None if split.train_total is None else split.train_total * epochs)

        self._check_memory(quest_id, school)
        if self.probe_memory if self.probe_memory is not None else self.accelerator.device.type == "cuda":
            self._probe_memory()
        pending = school.steps(train, rows_per_step, t.max_length, t.packing)
        mark = time.perf_counter()  # tokens/s counts tokenization and compute, not evaluation or saving
        rows = next(pending, None)
        while rows is not None:
            if self.ranks.decide(should_stop):  # rank 0's control channel decides for the group
                return result("interrupted")
            examples = [ex for row in rows for ex in row]
            start, end = cursor, cursor + len(examples)
            metrics = self._optimizer_step(rows, quest_id, start, end, school)
            cursor = self.cursor[ckpt.KEY_EXAMPLES_DONE] = end  # consumed, also when the update was skipped
            rows = next(pending, None)  # the next step, tokenized now; None: this was the quest's last
            if metrics is None:
                mark = time.perf_counter()
                continue
            loss, grad_norm, learning_rate, n_tokens, school_metrics = metrics
            self.global_step += 1
            steps += 1
            self.last_loss = loss
            tokens_per_second = n_tokens / max(time.perf_counter() - mark, 1e-9)
            self.ledger.record_step(
                global_step=self.global_step, quest_id=quest_id, loss=loss, learning_rate=learning_rate,
                grad_norm=grad_norm, tokens=n_tokens, tokens_per_second=tokens_per_second,
                example_start=start, example_end=end, example_lines=[e.line for e in examples],
                quest_steps=base_steps + steps, metrics=school_metrics)
            trackers.log(self.accelerator, {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                                            "tokens_per_second": tokens_per_second, **(school_metrics or {})},
                         self.global_step)
            level = logging.INFO if self.global_step % 10 == 0 or steps == 1 else logging.DEBUG
            self.log.log(level, "step %d quest %d loss %.4f lr %.3g grad_norm %.3f %.0f tokens/s examples %d-%d",
                         self.global_step, quest_id, loss, learning_rate, grad_norm, tokens_per_second,
                         start, end - 1)
            if t.eval_steps and self.global_step % t.eval_steps == 0:
                run_eval()
            if rows is not None:  # after the last step the quest-end checkpoint follows anyway
                if self.global_step % t.save_steps == 0:
                    self.save_checkpoint("save_steps")
                elif time.monotonic() - self._last_save >= t.save_interval_minutes * 60:
                    self.save_checkpoint("save_interval")
            mark = time.perf_counter()

        run_eval()
        self.cursor[ckpt.KEY_QUEST_DONE] = True
        self.save_checkpoint("quest_end")
        return result("completed")

    def _prepare_reference(self, school: School, quest_id: int, items: list, eval_set: list,
                           path: Path | None, rows_per_step: int, examples_done: int) -> int:
        """:func:`core.schools.reference.prepare`; in a group rank 0 computes and stores the sidecar first,
        then the other ranks read it (the same values on every rank)."""
        pinned = None
        if self.ranks.is_main or path is None:
            pinned = reference.prepare(self, school, quest_id, items, eval_set, path, rows_per_step, examples_done)
        self.ranks.barrier()
        if pinned is None:
            pinned = reference.prepare(self, school, quest_id, items, eval_set, path, rows_per_step, examples_done)
        return pinned

    def _quest_order(self, quest_id: int, quest: dict | None) -> tuple[int, bool]:
        """``(epochs, shuffle)`` of this quest: its ``schools`` rule by file name
        (:func:`core.config.quest_rule_for`), or the values it started with when resuming it from the
        checkpoint's cursor (the cursor's meaning depends on them; a changed rule applies to new quests)."""
        rule = quest_rule_for(str(quest["name"]) if quest else "", self.config.schools)
        epochs, shuffle = rule.epochs, rule.shuffle
        rc = self.resume_cursor
        if rc and rc.get(ckpt.KEY_QUEST_ID) == quest_id and not rc.get(ckpt.KEY_QUEST_DONE):
            pinned = (int(rc.get(ckpt.KEY_EPOCHS, 1)), bool(rc.get(ckpt.KEY_SHUFFLE, False)))
            if pinned != (epochs, shuffle):
                self._warn("order_pinned", f"quest {quest_id} started with epochs={pinned[0]}, shuffle="
                           f"{pinned[1]}; keeping them (not epochs={epochs}, shuffle={shuffle}) so its cursor "
                           "stays exact", quest_id=quest_id)
            return pinned
        return epochs, shuffle

    def _holdout_every(self, quest_id: int) -> int:
        """``eval_holdout_every`` for this quest: the value it started with when resuming it from the
        checkpoint's cursor (train example indices depend on it), else the config's."""
        every = self.config.training.eval_holdout_every
        rc = self.resume_cursor
        if rc and rc.get(ckpt.KEY_QUEST_ID) == quest_id and not rc.get(ckpt.KEY_QUEST_DONE):
            pinned = rc.get(ckpt.KEY_HOLDOUT_EVERY, every)
            if pinned != every:
                self._warn("holdout_pinned", f"quest {quest_id} started with eval_holdout_every={pinned}; "
                           f"keeping it (not {every}) so its example indices stay valid", quest_id=quest_id)
            return pinned
        return every

    def _optimizer_step(self, rows: list[list[Any]], quest_id: int, start: int, end: int, school: School
                        ) -> tuple[float, float, float, int, dict[str, float] | None] | None:
        """Forward/backward over the step's micro-batches, clip, update. Returns ``(loss, grad_norm,
        learning_rate, tokens, school metrics)``, or None when the update was skipped (no trainable token,
        non-finite loss or gradient norm, fp16 overflow); warnings name the examples [start, end) of the quest."""
        t = self.config.training
        while True:  # once, unless CUDA runs out of memory: then again with half the micro-batch
            if self.ranks.distributed:  # this rank's rows of the step; sums all-reduced (core.distributed)
                batches, n_trainable, n_tokens = collate_local(self, school, rows)
            else:
                batches = [school.collate(self, mb) for mb in micro_batches(rows, self.micro_batch_size)]
                n_trainable, n_tokens = school.denominator(batches), school.tokens(batches)
            if n_trainable == 0:
                self._warn("empty_step", f"examples {start}-{end - 1} of quest {quest_id} carry no trainable "
                           "token (all masked or truncated away); skipped", quest_id=quest_id)
                return None
            try:
                if self.ranks.distributed:
                    school.start_step(self, [school.collate(self, mb) for mb in micro_batches(
                        rows, self.micro_batch_size)] if school.start_step_reads_all_rows else batches)
                    loss_total, metric_total = forward_backward(self, school, rows, batches, n_trainable)
                else:
                    school.start_step(self, batches)
                    loss_total, metric_total = self._forward_backward(school, batches, n_trainable)
                break
            except torch.OutOfMemoryError as exc:
                if self.ranks.distributed:  # the other ranks wait in the all-reduce: the group restarts
                    raise
                error = str(exc)  # leave the except block first: its traceback holds the step's tensors
            self._out_of_memory(error, f"examples {start}-{end - 1} of quest {quest_id}")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
        # the step's only host sync: two scalars for the metrics (and the school's metric sums and counts)
        scalars = [loss_total / n_trainable, grad_norm.float().to(loss_total.device)]
        if metric_total is not None:
            scalars.extend(metric_total.to(loss_total.device).reshape(-1))
        values = torch.stack(scalars).tolist()
        loss, norm = values[0], values[1]
        school_metrics = None
        if metric_total is not None:
            sums = values[2:]
            school_metrics = school.finish_metrics({
                name: sums[2 * k] / sums[2 * k + 1] for k, name in enumerate(school.metric_names)
                if sums[2 * k + 1] > 0 and math.isfinite(sums[2 * k])})
        learning_rate = self.optimizer.param_groups[0]["lr"]
        if not math.isfinite(loss) or (not math.isfinite(norm) and self.mixed_precision != "fp16"):
            self.optimizer.zero_grad(set_to_none=True)
            lines = [ex.line for row in rows for ex in row]
            self._warn("nonfinite_loss", f"loss {loss} / grad_norm {norm} at examples {start}-{end - 1} of quest "
                       f"{quest_id}: update skipped", quest_id=quest_id, lines=lines)
            self.nonfinite_streak += 1
            if self.nonfinite_streak >= t.max_nonfinite_steps:
                self._roll_back(quest_id)  # raises TrainingRolledBack
            return None
        self.optimizer.step()
        skipped = self.accelerator.optimizer_step_was_skipped  # fp16 loss scaling found inf gradients
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            return None
        self.scheduler.step()
        self.nonfinite_streak = self.rollbacks_in_a_row = 0
        return loss, norm, learning_rate, n_tokens, school_metrics

    def _forward_backward(self, school: School, batches: list[Any], n_trainable: int
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Accumulate the gradients of the step's micro-batches; returns the summed loss (fp32 scalar) and
        the school's summed metrics (``(M, 2)`` sums and counts, or None)."""
        loss_total = torch.zeros((), device=self.accelerator.device)
        metric_total = None
        for b in batches:
            loss_sum, metrics = school.loss_sum(self, b)
            self.accelerator.backward(loss_sum / n_trainable)  # normalized over the whole optimizer step
            loss_total += loss_sum.detach()
            if metrics is not None:
                metric_total = metrics.detach() if metric_total is None else metric_total + metrics.detach()
        return loss_total, metric_total

    def school_of(self, quest: dict[str, Any] | None) -> School:
        """The school training ``quest``: its ledger ``school`` (set by validation) with the settings of the
        ``config.schools`` rule matching its name, else chosen by its name and format (:mod:`core.schools`)."""
        name = (quest or {}).get("name") or ""
        default, rule = schools.school_for(name, (quest or {}).get("format"), self.config)
        return schools.make_school((quest or {}).get("school") or default, rule)

    def _out_of_memory(self, error: str, where: str) -> None:
        """After ``torch.OutOfMemoryError``: drop the partial gradients, free memory and halve the
        micro-batch (accumulation doubles: same rows per step). Raises ``torch.OutOfMemoryError`` when
        the micro-batch is already one row."""
        self.optimizer.zero_grad(set_to_none=True)
        free_memory()
        old = self.micro_batch_size
        if old == 1:
            raise torch.OutOfMemoryError(f"out of memory at {where} with micro_batch_size 1: lower "
                                         f"training.max_length or use a smaller model ({error})")
        self.micro_batch_size = old // 2
        t = self.config.training
        rows = t.micro_batch_size * t.gradient_accumulation_steps
        self._warn("out_of_memory", f"out of memory at {where} with micro_batch_size {old}: retrying with "
                   f"micro_batch_size {self.micro_batch_size} and gradient accumulation "
                   f"{math.ceil(rows / self.micro_batch_size)} (same {rows} rows per optimizer step)",
                   micro_batch_size=self.micro_batch_size, previous_micro_batch_size=old, error=error[:500])

    def _check_memory(self, quest_id: int, school: School) -> None:
        """At a quest's start: a ``memory_warning`` event (never an error) when the training memory estimate
        (:mod:`core.memory`), with the models the quest's school holds beside the hero (a teacher, a frozen
        reference copy), exceeds what this process can use on its device."""
        device = self.accelerator.device.type
        try:
            est = memory.estimate_for_realm(self.realm, self.config, device=device,
                                            bf16_supported=self.mixed_precision == "bf16" or device != "cuda")
            extra = school.other_model_bytes(self)
            if extra:
                est = est.with_other_models(extra, {"distill": "the teacher"}.get(school.name,
                                                                  "the quest-start reference copy"))
            problem = memory.fit_problem(est, memory.available_bytes(device))
        except Exception as exc:  # noqa: BLE001 - an estimate that cannot be made must not stop training
            self.log.info("no memory estimate: %s: %s", type(exc).__name__, exc)
            return
        if problem:
            self._warn("memory_warning", f"quest {quest_id}: {problem}", quest_id=quest_id,
                       estimate_bytes=est.total_bytes)

    def _probe_memory(self) -> None:
        """Forward/backward on ``micro_batch_size`` rows of ``max_length`` tokens (every step's batches are
        at most that), halving the micro-batch while it runs out of memory; gradients dropped, RNG restored
        (exact resume is unaffected)."""
        t = self.config.training
        token = self.tokenizer.pad_token_id or 0
        rng = ckpt.rng_state()
        while True:
            full = TokenizedExample([token] * t.max_length, [token] * t.max_length)
            batch = self._collate([[full]] * self.micro_batch_size)  # as the steps' batches are built
            try:
                if self.ranks.distributed:  # no gradient all-reduce: a rank out of memory would leave it waiting
                    with self.accelerator.no_sync(self.model):
                        self._loss_sum(batch).backward()
                else:
                    self._loss_sum(batch).backward()
                error = None
            except torch.OutOfMemoryError as exc:
                error = str(exc)
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                ckpt.set_rng_state(rng)
            if self.ranks.distributed:  # every rank uses the smallest micro-batch that fits on all of them
                fits = self.ranks.agree_min(self.micro_batch_size if error is None else self.micro_batch_size // 2)
                if error is None and fits == self.micro_batch_size:
                    return
                error = error or f"another rank ran out of memory with micro_batch_size {self.micro_batch_size}"
            if error is None:
                return
            self._out_of_memory(error, f"the memory probe ({t.max_length} tokens per row)")

    def _roll_back(self, quest_id: int) -> None:
        """Reload the last good checkpoint with the learning rate times ``training.nonfinite_lr_factor``
        (an error event), then raise :class:`TrainingRolledBack`; :class:`NonFiniteLossError` after
        ``training.max_nonfinite_rollbacks`` rollbacks with no good step in between."""
        t = self.config.training
        from_step, streak = self.global_step, self.nonfinite_streak
        self.nonfinite_streak = 0
        if self.rollbacks_in_a_row >= t.max_nonfinite_rollbacks:
            raise NonFiniteLossError(f"loss still not finite after {self.rollbacks_in_a_row} rollback(s) to "
                                     f"global step {from_step} with learning rate x{self.lr_scale:g}")
        self.rollbacks_in_a_row += 1
        old_lr = t.learning_rate * self.lr_scale
        scale = self.lr_scale * t.nonfinite_lr_factor
        store_lr_scale(self.ledger, self.config.hero.name, scale, t.learning_rate, from_step)
        self.cleanup()
        self.setup()  # newest loadable checkpoint, ledger rolled back to it, lr_scale read back
        message = (f"loss not finite for {streak} steps in a row at global step {from_step} (quest {quest_id}): "
                   f"rolled back to global step {self.global_step} "
                   f"({Path(self.last_checkpoint).name if self.last_checkpoint else 'the starting weights'}), "
                   f"learning rate {old_lr:.3g} -> {t.learning_rate * self.lr_scale:.3g}")
        self.log.error(message)
        self.ledger.event("nonfinite_rollback", message, level="error", quest_id=quest_id, from_step=from_step,
                          to_step=self.global_step, lr_scale=self.lr_scale)
        raise TrainingRolledBack(message, quest_id=quest_id, from_step=from_step, to_step=self.global_step,
                                 lr_scale=self.lr_scale)

    @torch.no_grad()
    def evaluate(self, examples: list[TokenizedExample]) -> float:
        """Mean next-token loss (nats per trainable token) over ``examples`` (truncated to max_length);
        NaN when they hold no trainable token. Consumes no RNG, so it never perturbs training."""
        t = self.config.training
        self.model.eval()
        try:
            total = torch.zeros((), device=self.accelerator.device)
            n = 0
            for mb in micro_batches(pack_rows(examples, t.max_length, t.packing), self.micro_batch_size):
                batch = self._collate(mb)
                if batch.num_trainable:
                    total += self._loss_sum(batch)
                    n += batch.num_trainable
        finally:
            self.model.train()
        return (total / n).item() if n else float("nan")

    # --- checkpoints and teardown -----------------------------------------------------------------------
    def save_checkpoint(self, reason: str) -> Path:
        """Save the checkpoint of ``global_step`` (:func:`core.checkpoint.checkpoint_name`) atomically (replacing one of the same step) with the current cursor;
        ``reason``: e.g. save_steps, save_interval, quest_end, sigterm. Returns its path.

        Raises :class:`CheckpointSkipped` when ``before_save`` found no room and a stop was requested, and
        ``OSError`` when writing fails (after one retry through ``before_save`` on a full disk).

        In a group (:mod:`core.distributed`) rank 0 writes it (DDP: every rank holds the same weights and
        optimizer state); the other ranks only note it. ``world_size`` is recorded for information: the
        layout is the same for any number of processes, so a checkpoint resumes on any number."""
        if not self.ranks.is_main:
            self.last_saved_step, self._last_save = self.global_step, time.monotonic()
            self.last_checkpoint = self.checkpoints_dir / ckpt.checkpoint_name(self.global_step)
            return self.last_checkpoint
        if self.before_save is not None and not self.before_save():
            raise CheckpointSkipped(f"no disk space for checkpoint {ckpt.checkpoint_name(self.global_step)}; not saved")
        hero = {k: self.hero_info.get(k) for k in ("name", "base_model", "architecture", "parameters", "newborn",
                                                   "adapter", "trainable_parameters")}
        info = {ckpt.KEY_CURSOR: self.cursor, ckpt.KEY_LOSS: self.last_loss, ckpt.KEY_EVAL_LOSS: self.last_eval_loss,
                ckpt.KEY_REASON: reason, ckpt.KEY_HERO: hero, ckpt.KEY_CONFIG: self.config.model_dump(),
                ckpt.KEY_WORLD_SIZE: self.ranks.world_size}
        if self.adapter is not None:
            info[ckpt.KEY_ADAPTER] = self.adapter
        started = time.perf_counter()
        save = functools.partial(ckpt.save_checkpoint, self.checkpoints_dir, global_step=self.global_step,
                                 model=self._raw_model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                 scheduler=self.scheduler, info=info)
        try:
            path = save()
        except OSError as exc:
            if exc.errno != errno.ENOSPC or self.before_save is None:
                raise
            self._warn("disk_full", f"disk full while saving {ckpt.checkpoint_name(self.global_step)}; pruning and retrying")
            if not self.before_save():
                raise CheckpointSkipped(f"disk full: checkpoint {ckpt.checkpoint_name(self.global_step)} not saved") from exc
            path = save()
        self.last_checkpoint, self.last_saved_step = path, self.global_step
        self.hero_info["checkpoint"] = str(path)
        self._last_save = time.monotonic()
        seconds = time.perf_counter() - started
        self.ledger.event("checkpoint_saved", f"checkpoint {path.name} saved ({reason}, {seconds:.1f} s)",
                          step=self.global_step, path=str(path), reason=reason, cursor=self.cursor)
        self.log.info("checkpoint %s saved (%s) in %.1f s", path, reason, seconds)
        if self.after_save is not None:
            self.after_save(path)
        return path

    def latest_checkpoint_info(self) -> dict[str, Any] | None:
        """``{"step", "path"}`` of the checkpoint last saved or loaded, None before the first."""
        if self.last_checkpoint is None:
            return None
        return {"step": ckpt.step_of(self.last_checkpoint), "path": str(self.last_checkpoint)}

    def cleanup(self) -> None:
        """Release the model and optimizer (and GPU memory) and reset accelerate's process state."""
        from accelerate.state import AcceleratorState, GradientState

        if self.accelerator is not None:
            trackers.finish(self.accelerator)
            self.accelerator.free_memory()
        self.model = self._raw_model = self.optimizer = self.scheduler = self.accelerator = None
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _warn(self, kind: str, message: str, **data: Any) -> None:
        self.log.warning(message)
        self.ledger.event(kind, message, level="warning", **data)
