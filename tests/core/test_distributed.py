"""Data parallel training (core.distributed): two processes equal one.

The end-to-end tests run the daemon as real process groups (``accelerate launch --num_processes 2``, gloo
on the CPU, DDP) on the same quests and global batch as one plain process, and compare the ledgers: the
same example lines at each global step, the same final global step, losses equal within
:data:`LOSS_RTOL` (relative; measured: ~1e-7, the order of float additions differs), also after a 2-process
checkpoint resumes on 1 process and after one rank is SIGKILLed under the supervisor.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from core import checkpoint as ckpt
from core.distributed import (
    FollowerLedger,
    Ranks,
    config_file_problem,
    launch_command,
    local_rows,
    micro_batches_per_rank,
    sharded_backend_problem,
)
from core.ledger import Ledger
from core.realm import Realm, init_realm
from safety.processes import descendants, kill_all
from tests.conftest import FAST_CONFIG, PYTHON, deep_update, python_env, wait_for, write_text_quest
from tests.resume import finish_until_idle

LOSS_RTOL = 1e-4
"""Relative tolerance between the losses (and gradient norms) of 1 and 2 processes."""

# micro-batch 1 x accumulation 4: 4 rows per step, 2 per rank; 29 and 31 examples end with a step of 1 row
# (rank 1 has none: a zero-weight pass) and of 3 rows (rank 1 has one pass fewer than rank 0)
SETTINGS = {"training": {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "save_steps": 3},
            "retention": {"enabled": False},
            "supervisor": {"backoff_initial_seconds": 0.2, "poll_interval_seconds": 0.2, "stop_timeout_seconds": 60}}
QUESTS = {"a.jsonl": 29, "b.jsonl": 31}


# --- units ---------------------------------------------------------------------------------------------------
def test_ranks_from_the_launcher_environment():
    assert Ranks.from_env({}) == Ranks(0, 1) and not Ranks.from_env({}).distributed
    r = Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert (r.rank, r.world_size, r.is_main, r.distributed) == (1, 2, False, True)
    assert Ranks.from_env({"RANK": "5", "WORLD_SIZE": "2"}) == Ranks(0, 1)  # nonsense: one process
    assert Ranks.from_env({"RANK": "x", "WORLD_SIZE": "2"}) == Ranks(0, 1)
    assert Ranks().accelerator_kwargs() == {}  # one process: the Accelerator exactly as before
    assert Ranks().share({"a": 1}) == {"a": 1} and Ranks().decide(lambda: 7) == 7


def test_rows_split_round_robin_and_every_rank_runs_rank_0s_passes():
    rows = [[i] for i in range(7)]
    assert local_rows(rows, Ranks(0, 2)) == [[0], [2], [4], [6]]
    assert local_rows(rows, Ranks(1, 2)) == [[1], [3], [5]]
    assert sorted(x for r in range(3) for x in local_rows(rows, Ranks(r, 3))) == rows  # each row once
    assert micro_batches_per_rank(7, 2, 2) == 2        # rank 0: 4 rows in 2 micro-batches
    assert micro_batches_per_rank(1, 4, 2) == 1        # rank 1 has no row: still one (zero-weight) pass
    assert micro_batches_per_rank(8, 1, 4) == 2


def test_follower_ledger_writes_nothing():
    ledger = FollowerLedger()
    ledger.quests[3] = {"id": 3, "name": "q"}
    assert ledger.get_quest(3)["name"] == "q" and ledger.get_quest(4) is None
    assert ledger.rollback_to(5) == 0 and ledger.event("x", "y", level="warning") is None
    assert ledger.record_step(global_step=1) is None and ledger.get_value("k", 1.0) == 1.0


def test_launch_command():
    default = launch_command(2)
    assert default[:3] == ["accelerate.commands.launch", "--num_processes", "2"] and "--multi_gpu" in default
    assert default[default.index("--main_process_port") + 1] == "0"  # a free port: groups side by side
    own = launch_command(None, "/cfg.yaml")
    assert "--num_processes" not in own and own[own.index("--config_file") + 1] == "/cfg.yaml"
    assert "--multi_gpu" not in own  # the file says what to run (FSDP, DeepSpeed, ...)


def test_sharded_backends_are_refused_with_the_reason(tmp_path):
    from accelerate.utils import DistributedType

    assert sharded_backend_problem(DistributedType.MULTI_GPU) is None and sharded_backend_problem(None) is None
    assert "FSDP" in sharded_backend_problem(DistributedType.FSDP)
    assert "DEEPSPEED" in sharded_backend_problem("DEEPSPEED")
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n")
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [unclosed\n")
    assert config_file_problem(str(ddp)) is None
    assert "FSDP shards the weights" in config_file_problem(str(fsdp))
    assert "cannot be read" in config_file_problem(str(broken))


# --- real process groups -------------------------------------------------------------------------------------
def make_realm(root: Path) -> Realm:
    realm = init_realm(root, overrides=deep_update(FAST_CONFIG, SETTINGS))
    for name, n in QUESTS.items():
        write_text_quest(realm.inbox / name, n, prefix=name[0])
    return realm


def daemon_command(realm: Realm, processes: int, *extra: str) -> list[str]:
    launcher = ["-m", *launch_command(processes)] if processes > 1 else []
    return [PYTHON, *launcher, "-m", "training", "--realm", str(realm.root), "daemon", *extra]


@contextmanager
def group_process(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Start ``command`` (a launcher and its ranks, or one process), its output appended to ``log_path``; when
    the block ends with it still running, kill it and every rank it started (they would outlive it)."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, env=python_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            members = descendants(proc.pid)
            proc.kill()
            kill_all(members)
            proc.wait()


def run_group(command: list[str], log_path: Path, timeout: float = 300) -> int:
    """Run ``command`` to its end (:func:`group_process`; killed on a timeout). Returns its exit status."""
    with group_process(command, log_path) as proc:
        return proc.wait(timeout=timeout)


def run_daemon(realm: Realm, processes: int, timeout: float = 300) -> None:
    """``daemon --until-idle`` to the end, on one process (tests/resume.py's harness) or on a group."""
    if processes == 1:
        finish_until_idle(realm, timeout)
        return
    log = realm.root / f"daemon-{processes}.log"
    assert run_group(daemon_command(realm, processes, "--until-idle"), log, timeout) == 0, log.read_text()[-3000:]


def steps(realm: Realm) -> list[tuple]:
    """``(global_step, quest name, example lines, loss, grad_norm)`` of every step in the ledger."""
    ledger = Ledger(realm.ledger_path)
    try:
        names = {q["id"]: q["name"] for q in ledger.list_quests()}
        return [(s["global_step"], names[s["quest_id"]], tuple(json.loads(s["examples_json"])), s["loss"],
                 s["grad_norm"]) for s in ledger.steps()]
    finally:
        ledger.close()


def last_step(realm: Realm) -> int:
    if not realm.ledger_path.exists():
        return 0
    ledger = Ledger(realm.ledger_path)
    try:
        row = ledger.last_step()
        return row["global_step"] if row else 0
    finally:
        ledger.close()


def reach_step(realm: Realm, step: int, timeout: float = 240) -> None:
    """Wait until the ledger's last global step is ``>= step``, polling closely (a tiny model's steps take
    a few tens of milliseconds: a fault injected then lands mid-quest)."""
    deadline = time.monotonic() + timeout
    while last_step(realm) < step:
        assert time.monotonic() < deadline, f"global step {step} not reached in {timeout:.0f} s"
        time.sleep(0.01)


def quests_done(realm: Realm) -> bool:
    ledger = Ledger(realm.ledger_path)
    try:
        rows = ledger.list_quests()
        return len(rows) == len(QUESTS) and all(r["state"] == "completed" for r in rows)
    finally:
        ledger.close()


def assert_same_training(got: list[tuple], want: list[tuple]) -> None:
    assert [s[:3] for s in got] == [s[:3] for s in want]  # same examples at each global step, same last step
    for g, w in zip(got, want, strict=True):
        assert g[3] == pytest.approx(w[3], rel=LOSS_RTOL), (g, w)
        assert g[4] == pytest.approx(w[4], rel=LOSS_RTOL), (g, w)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[tuple]:
    """The reference: both quests trained by one plain process."""
    realm = make_realm(tmp_path_factory.mktemp("one") / "realm")
    run_daemon(realm, 1)
    trained = steps(realm)
    assert trained[-1][0] == 16 and sum(len(s[2]) for s in trained) == sum(QUESTS.values())
    return trained


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, one_process):
    realm = make_realm(tmp_path / "realm")
    run_daemon(realm, 2)
    assert_same_training(steps(realm), one_process)
    info = ckpt.read_checkpoint_info(ckpt.latest_checkpoint(realm.checkpoints_dir("hero")))
    assert info[ckpt.KEY_WORLD_SIZE] == 2 and info[ckpt.KEY_GLOBAL_STEP] == 16


def train_until(realm: Realm, processes: int, step: int) -> Path:
    """Run the daemon on ``processes`` processes until the ledger reaches ``step``, then stop it warmly
    (SIGTERM; a launcher passes it on to its ranks, rank 0 stops the group). Returns its last checkpoint."""
    log = realm.root / f"daemon-{processes}.log"
    with group_process(daemon_command(realm, processes), log) as proc:
        reach_step(realm, step)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)  # (torchrun's own status after a SIGTERM is 1, whatever its ranks did)
    stopped_at = ckpt.latest_checkpoint(realm.checkpoints_dir("hero"))
    info = ckpt.read_checkpoint_info(stopped_at)
    # (its reason: "stop", or save_steps / quest_end when the stop came right after such a save)
    assert info[ckpt.KEY_WORLD_SIZE] == processes, info
    assert step <= ckpt.step_of(stopped_at) < 16, log.read_text()[-3000:]  # mid-way
    return stopped_at


@pytest.mark.slow
def test_checkpoints_resume_exactly_on_another_number_of_processes(tmp_path, one_process):
    realm = make_realm(tmp_path / "realm")
    first = train_until(realm, 2, 3)  # 2 processes -> 1
    assert "rank 1: stop at global step" in (realm.root / "daemon-2.log").read_text()
    second = train_until(realm, 1, max(ckpt.step_of(first) + 2, 10))  # 1 process -> 2, mid-way in quest b
    assert ckpt.step_of(second) > ckpt.step_of(first)
    run_daemon(realm, 2)
    assert_same_training(steps(realm), one_process)


def _rank(launcher_pid: int, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} under pid {launcher_pid}")


@pytest.mark.slow
def test_a_sigkilled_rank_restarts_the_group_and_resume_is_exact(tmp_path, one_process):
    realm = make_realm(tmp_path / "realm")
    log = open(realm.root / "supervise.log", "ab")  # noqa: SIM115 - closed in finally
    supervisor = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "supervise", "--no-tavern",
                                   "--processes", "2"], env=python_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: last_step(realm) >= 1, timeout=240, what="the group training")
        launcher = psutil.Process(supervisor.pid).children()[0]
        victim = _rank(launcher.pid, 1)
        reach_step(realm, 3)
        victim.kill()  # SIGKILL one rank mid-quest
        killed_at = last_step(realm)
        assert 3 <= killed_at < 16, killed_at
        wait_for(lambda: not launcher.is_running() or launcher.status() == psutil.STATUS_ZOMBIE, timeout=120,
                 what="the launcher stopping the other rank")
        wait_for(lambda: quests_done(realm), timeout=300, what="both quests completed after the restart")
        new_launcher = psutil.Process(supervisor.pid).children()[0]
        group = [_rank(new_launcher.pid, 0), _rank(new_launcher.pid, 1)]
        assert new_launcher.pid != launcher.pid and victim.pid not in [p.pid for p in group]  # both restarted
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(timeout=120)
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
            log.close()
    ledger = Ledger(realm.ledger_path)
    try:
        crashes = [e for e in ledger.events(limit=10000) if e["kind"] == "crash"]
    finally:
        ledger.close()
    assert crashes, "the rank's death is recorded as a crash of the daemon group"
    crash = json.loads(crashes[-1]["data"]) if isinstance(crashes[-1]["data"], str) else crashes[-1]["data"]
    assert crash["crash_class"] == "signal" and crash["summary"].startswith("rank 1: killed by SIGKILL"), crash
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in group)  # stopped with it
    assert_same_training(steps(realm), one_process)


def run_two_ranks_with(tmp_path, script_text: str, training: dict) -> tuple[str, list[dict], list[dict]]:
    """A realm with ``training`` settings and 29 text records, ``daemon --until-idle`` launched on 2 ranks
    through ``script_text`` (a fault injected into the engine); returns the group's log, the
    ledger's events and trained steps. AssertionError (with the log's tail) when the group fails."""
    realm = init_realm(tmp_path / "realm", overrides=deep_update(FAST_CONFIG, deep_update(SETTINGS,
                                                                                            {"training": training})))
    write_text_quest(realm.inbox / "a.jsonl", 29, prefix="a")
    script = tmp_path / "inject.py"
    script.write_text(script_text)
    log = realm.root / "daemon-2.log"
    status = run_group([PYTHON, "-m", *launch_command(2), str(script), "--realm", str(realm.root), "daemon",
                        "--until-idle"], log)
    assert status == 0, log.read_text()[-3000:]
    ledger = Ledger(realm.ledger_path)
    try:
        return log.read_text(), ledger.events(limit=10000), ledger.steps()
    finally:
        ledger.close()


INJECT_NAN_ON_RANK_1 = '''
import sys
from core.engine import Engine
from core.distributed import Ranks
from training.cli import main

real = Engine._loss_sum
left = {"n": 4}  # rank 1 computes 2 of the 4 rows of a step: 2 passes per attempt


def loss_sum(self, batch):  # rank 1 alone: NaN in the two attempts at global step 5
    loss = real(self, batch)
    if Ranks.from_env().rank == 1 and self.model.training and self.global_step == 4 and left["n"] > 0:
        left["n"] -= 1
        return loss * float("nan")
    return loss


Engine._loss_sum = loss_sum
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_a_nan_on_one_rank_rolls_back_every_rank_together(tmp_path):
    _, events, trained = run_two_ranks_with(tmp_path, INJECT_NAN_ON_RANK_1,
                                            {"max_nonfinite_steps": 2, "nonfinite_lr_factor": 0.5})
    assert [e["kind"] for e in events].count("nonfinite_loss") == 2  # the all-reduced loss: NaN for the group
    rollback = [json.loads(e["data"]) for e in events if e["kind"] == "nonfinite_rollback"]
    assert len(rollback) == 1 and rollback[0]["to_step"] == 3  # both ranks back at the checkpoint of step 3
    assert [s["global_step"] for s in trained] == list(range(1, 9))
    assert sorted(ln for s in trained for ln in json.loads(s["examples_json"])) == list(range(1, 30))  # once each
    assert trained[-1]["learning_rate"] == pytest.approx(FAST_CONFIG["training"]["learning_rate"] * 0.5)


INJECT_PROBE_OOM_ON_RANK_1 = '''
import sys
import torch
from core.engine import Engine
from core.distributed import Ranks
from training.cli import main

real_init, real_loss_sum = Engine.__init__, Engine._loss_sum


def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self.probe_memory = True  # the probe CUDA runs at each quest's start, here on the CPU


def loss_sum(self, batch):  # rank 1 alone cannot fit the probe's 2 rows of max_length tokens
    if Ranks.from_env().rank == 1 and batch.num_tokens >= 2 * self.config.training.max_length:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    return real_loss_sum(self, batch)


Engine.__init__, Engine._loss_sum = init, loss_sum
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_an_out_of_memory_probe_on_one_rank_halves_every_ranks_micro_batch(tmp_path):
    text, events, trained = run_two_ranks_with(tmp_path, INJECT_PROBE_OOM_ON_RANK_1,
                                               {"micro_batch_size": 2, "gradient_accumulation_steps": 2})
    assert "realm.rank1: out of memory at the memory probe" in text  # rank 1 ran out itself
    events = [json.loads(e["data"]) for e in events if e["kind"] == "out_of_memory"]
    assert [(e["previous_micro_batch_size"], e["micro_batch_size"]) for e in events] == [(2, 1)]  # rank 0 too
    assert [s["global_step"] for s in trained] == list(range(1, 9))
    assert sorted(ln for s in trained for ln in json.loads(s["examples_json"])) == list(range(1, 30))


def grpo_realm(root: Path, prompts: int) -> Realm:
    """A realm whose ``sums*.jsonl`` quests train with Champion (GRPO): 4 completions sampled per prompt, a
    numeric reward; ``prompts`` prompts, 4 per step (2 per rank of 2: each rank samples for its own)."""
    from tests.core.schools.test_champion import RULES, write_prompts

    realm = init_realm(root, overrides=deep_update(FAST_CONFIG, deep_update(SETTINGS, {"schools": RULES})))
    write_prompts(realm.inbox / "sums.jsonl", prompts)
    return realm


def step_metrics(realm: Realm) -> dict[int, dict[str, float]]:
    ledger = Ledger(realm.ledger_path)
    try:
        return ledger.step_metrics()
    finally:
        ledger.close()


@pytest.mark.slow
def test_a_grpo_quest_on_two_processes_equals_one(tmp_path):
    one, two = grpo_realm(tmp_path / "one", 10), grpo_realm(tmp_path / "two", 10)
    run_daemon(one, 1)
    run_daemon(two, 2)
    want, got = steps(one), steps(two)
    assert [s[0] for s in want] == [1, 2, 3] and sorted(ln for s in want for ln in s[2]) == list(range(1, 11))
    assert_same_training(got, want)  # the same completions were sampled: the same losses and gradients
    want_metrics, got_metrics = step_metrics(one), step_metrics(two)
    for step, metrics in want_metrics.items():
        assert got_metrics[step] == pytest.approx(metrics, rel=LOSS_RTOL, abs=1e-6)
        assert {"reward", "completions/mean_length"} <= set(metrics)
