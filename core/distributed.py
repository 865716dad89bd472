"""Data parallel training over N processes (ranks) with accelerate / ``torch.distributed``.

**How the ranks are started.** ``python -m training start-all --processes N`` makes the supervisor run the
daemon child as ``accelerate launch --num_processes N ... -m training daemon`` (:func:`launch_command`):
one launcher process whose N workers get accelerate's / torchrun's ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the engine's ``Accelerator`` joins them (gloo on the
CPU, NCCL on GPUs) and wraps the model in DDP. A user's accelerate config file (``--accelerate-config``)
sets GPUs, ports and machines; FSDP and DeepSpeed are refused (:func:`sharded_backend_problem`).

**Who does what.** Rank 0 is the daemon (:class:`core.daemon.Daemon`): it alone ingests, validates,
moves queue files, writes the ledger and the checkpoints, and talks to the control channel. The other
ranks are followers (:class:`core.follower.Follower`): they run the same :class:`core.engine.Engine`
with a :class:`FollowerLedger` (reads come from rank 0, writes are dropped) and do what rank 0 broadcasts
(:meth:`Ranks.send` / :meth:`Ranks.receive`, ``torch.distributed.broadcast_object_list``): train quest
``q`` from cursor ``c``, or stop. Every decision that could differ between processes is taken by rank 0
and broadcast (:meth:`Ranks.decide`): the checkpoint resumed from, the learning-rate scale, whether to
stop before each optimizer step.

**Same examples per global step for any N.** Every rank builds the same step plan from the same stored
quest file (the plan depends only on the cursor, :mod:`core.packing`); rank ``r`` of ``N`` computes the
loss of rows ``r, r + N, r + 2N, ...`` of each step (:func:`forward_backward`). Each rank back-propagates
``loss_sum x N / denominator`` where the denominator is the whole step's (SFT: its trainable tokens):
each rank collates its own rows once and the ranks sum their parts (:func:`collate_local`; a school whose
``start_step`` reads the whole step, KTO, collates all rows for it), and DDP averages the gradients over the N ranks: the update
is the sum of the step's per-row gradients over the step's denominator -- the 1-process update up to the
order of float additions. The step's summed loss and school metrics are all-reduced, so every rank takes
the same non-finite / rollback decision (:mod:`core.faults`). Only the last micro-batch of a step
synchronizes gradients (``accelerator.no_sync`` before it); a rank with fewer micro-batches than rank 0
runs zero-weight passes so every rank joins the same number of all-reduces.

**Faults.** A CUDA out-of-memory error on a rank is not retried with a smaller micro-batch (the other
ranks would wait in the all-reduce): the memory probe at each quest's start agrees on the smallest
micro-batch that fits on every rank (:meth:`Ranks.agree_min`), and an OOM after it ends the process; the
launcher then stops the other ranks and the supervisor restarts the group from the last checkpoint. Any
exception that leaves one rank's training loop alone (a dead peer, a quest file that changed, a full disk
while stopping) ends the rank the same way: the group never waits on a peer that is gone
(:class:`GroupOutOfSync`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from core.packing import micro_batches

if TYPE_CHECKING:
    from core.engine import Engine
    from core.schools.base import School

COLLECTIVE_TIMEOUT = timedelta(days=7)
"""How long a rank waits in a collective (a follower waits for rank 0's next order while the daemon is
idle or paused): long, because a dead peer is noticed at once by the transport (gloo: *connection closed
by peer*) and by the launcher, which stops the group when a rank exits."""

SHARDED_BACKENDS = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
"""accelerate distributed types that shard weights or optimizer state across ranks: rank 0 alone cannot write
a checkpoint that resumes exactly (:meth:`core.engine.Engine.save_checkpoint`), so they are refused."""

PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo", "Broken pipe",
                     "DistBackendError", "ProcessGroup")


class GroupOutOfSync(RuntimeError):
    """Rank 0 left a quest's training loop alone (an error its followers did not share): the process
    ends so that the launcher stops every rank and the supervisor restarts them from the last checkpoint."""


def is_peer_lost(exc: BaseException) -> bool:
    """True when ``exc`` comes from the process group (a rank died, the transport broke), not from the
    quest: such an error is not counted as a failed attempt of the quest."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_LOST_MARKERS)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` (0 = the daemon), ``world_size`` (1 = no group).
    From the launcher's ``RANK`` / ``WORLD_SIZE`` environment (:meth:`from_env`)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
        except ValueError:
            return cls()
        return cls(rank, world) if world > 1 and 0 <= rank < world else cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def accelerator_kwargs(self) -> dict[str, Any]:
        """Extra ``Accelerator(...)`` arguments for a group: gloo on the CPU (accelerate needs ``cpu=True``
        to form a CPU group), the long :data:`COLLECTIVE_TIMEOUT`, and DDP without buffer broadcasts
        (an LM's buffers, e.g. rotary frequencies, are not trained; without them a forward pass has no
        collective, so evaluation and reference passes never wait on a peer)."""
        if not self.distributed:
            return {}
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # torch names it forward_sync_buffers now, which accelerate's kwargs cannot pass yet: same effect here
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)

        return {"cpu": not torch.cuda.is_available(),
                "kwargs_handlers": [InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
                                    DistributedDataParallelKwargs(broadcast_buffers=False)]}

    # rank 0 decides, the others follow -------------------------------------------------------------------
    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (picklable; ``broadcast_object_list``)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, decision: Callable[[], Any]) -> Any:
        """``decision()`` called on rank 0 only; its result on every rank."""
        return self.share(decision() if self.is_main else None)

    def send(self, order: dict[str, Any]) -> None:
        """Rank 0: an order for the followers (:class:`core.follower.Follower`): ``{"op": "train", ...}``
        or ``{"op": "stop"}``."""
        if self.distributed:
            self.share(order)

    def receive(self) -> dict[str, Any]:
        """A follower: wait for rank 0's next order."""
        return self.share(None)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over all ranks (e.g. the micro-batch that fits everywhere)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all ranks (in place, returned)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor)
        return tensor


def _collective_device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rows(rows: list[list[Any]], ranks: Ranks) -> list[list[Any]]:
    """This rank's rows of an optimizer step: ``rows[rank::world_size]``."""
    return rows[ranks.rank::ranks.world_size]


def micro_batches_per_rank(n_rows: int, micro_batch_size: int, world_size: int) -> int:
    """Forward/backward passes every rank runs for a step of ``n_rows`` rows: rank 0's (it has the most)."""
    first = -(-n_rows // world_size)
    return max(1, -(-first // micro_batch_size))


def collate_local(engine: Engine, school: School, rows: list[list[Any]]) -> tuple[list[Any], int, int]:
    """This rank's micro-batches of a step (its :func:`local_rows` in micro-batches of
    ``engine.micro_batch_size``), each collated once, and the whole step's denominator and tokens: this
    rank's summed over the ranks (an all-reduce every rank joins)."""
    ranks: Ranks = engine.ranks
    mine = [school.collate(engine, mb) for mb in micro_batches(local_rows(rows, ranks), engine.micro_batch_size)]
    totals = torch.tensor([school.denominator(mine), school.tokens(mine)], dtype=torch.float64,
                          device=_collective_device())
    ranks.sum(totals)
    return mine, int(totals[0].item()), int(totals[1].item())


def forward_backward(engine: Engine, school: School, rows: list[list[Any]], mine: list[Any], denominator: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's version of ``Engine._forward_backward``: this rank's micro-batches ``mine`` of the step
    (:func:`collate_local`), each back-propagating ``loss_sum x world_size / denominator`` (DDP averages over
    the ranks), gradients synchronized at the last pass only. Returns the step's summed loss (fp32 scalar)
    and school metrics (``(M, 2)`` sums and counts, or None), all-reduced over the ranks: the same values on
    every rank."""
    ranks: Ranks = engine.ranks
    passes = micro_batches_per_rank(len(rows), engine.micro_batch_size, ranks.world_size)
    scale = ranks.world_size / denominator
    device = engine.device
    loss_total = torch.zeros((), device=device)
    n_metrics = len(school.metric_names)
    metric_total = torch.zeros((n_metrics, 2), device=device) if n_metrics else None
    padding = None
    for i in range(passes):
        if i < len(mine):
            batch, weight = mine[i], scale
        else:  # fewer rows than rank 0: a zero-weight pass on one row, so this rank joins the all-reduce
            padding = padding if padding is not None else school.collate(engine, local_rows(rows, ranks)[:1] or rows[:1])
            batch, weight = padding, 0.0
        sync = i == passes - 1
        with nullcontext() if sync else engine.accelerator.no_sync(engine.model):
            loss_sum, metrics = school.loss_sum(engine, batch)
            engine.accelerator.backward(loss_sum * weight)
        if weight:
            loss_total += loss_sum.detach()
            if metrics is not None and metric_total is not None:
                metric_total += metrics.detach().to(device)
    values = torch.cat([loss_total.reshape(1), metric_total.reshape(-1) if metric_total is not None
                        else loss_total.new_zeros(0)])
    ranks.sum(values)
    return values[0], values[1:].reshape(n_metrics, 2) if metric_total is not None else None


class FollowerLedger:
    """The ledger a follower's engine sees: rank 0 writes the real one, so writes here are dropped; the
    quests come from rank 0's orders (:attr:`quests`), and ``lr_scale`` from :meth:`Ranks.decide`."""

    def __init__(self) -> None:
        self.quests: dict[int, dict[str, Any]] = {}

    def get_quest(self, quest_id: int) -> dict[str, Any] | None:
        return self.quests.get(quest_id)

    def get_value(self, key: str, default: Any = None) -> Any:
        return default

    def rollback_to(self, global_step: int) -> int:
        return 0

    def event(self, *args: Any, **kwargs: Any) -> None:
        return None

    record_step = record_eval = set_value = event


def sharded_backend_problem(distributed_type: object) -> str | None:
    """Why an accelerate ``distributed_type`` (enum or its name) cannot train here, or None."""
    name = str(getattr(distributed_type, "value", distributed_type) or "").upper()
    if name not in SHARDED_BACKENDS:
        return None
    return (f"distributed_type {name} shards the weights or the optimizer state across processes, and the "
            "daemon's checkpoints (written by rank 0 alone, resumed exactly on any number of processes) need "
            "every rank to hold them whole: use DDP (distributed_type MULTI_GPU, the default of --processes)")


def config_file_problem(path: str) -> str | None:
    """What is wrong with an accelerate config file for the daemon (unreadable, or a sharded backend), or
    None. Read with accelerate's own loader."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(path)
    except Exception as exc:  # noqa: BLE001 - yaml/json/field errors of a user's file: said, not raised
        return f"--accelerate-config {path}: cannot be read ({type(exc).__name__}: {exc})"
    problem = sharded_backend_problem(getattr(config, "distributed_type", None))
    return f"--accelerate-config {path}: {problem}" if problem else None


def launch_command(processes: int | None, accelerate_config: str | None = None) -> list[str]:
    """The ``accelerate launch`` arguments (after ``python -m``) that run ``processes`` ranks (None: the
    config file's ``num_processes``) of the command that follows: ``--multi_gpu`` (DDP; on a CPU-only machine the ranks form a gloo group) unless an
    accelerate config file says how to launch (GPU ids, machines, ports); rendezvous port 0: a free one, chosen by
    the launcher (one node; several realms or tests may run groups at once)."""
    args = ["accelerate.commands.launch"] + (["--num_processes", str(processes)] if processes else [])
    if accelerate_config:
        args += ["--config_file", accelerate_config]
    else:
        args += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]
    return [*args, "--monitor_interval", "0.5"]
