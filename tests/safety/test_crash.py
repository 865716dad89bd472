"""Crash classification from exit status and log tail, and its record in the ledger."""

from __future__ import annotations

import signal

import pytest

from core.ledger import Ledger
from safety.crash import (
    CrashClass,
    MemoryFacts,
    classify_exit,
    read_log_tail,
    read_oom_kill_count,
    recent_crashes,
    record_crash,
)

GIB = 1024 ** 3


def tb(*lines):
    return "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("tail, expected", [
    (tb("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"), CrashClass.CUDA_OOM),
    (tb("OSError: [Errno 28] No space left on device"), CrashClass.DISK_FULL),
    (tb("ModuleNotFoundError: No module named 'transformers'"), CrashClass.IMPORT_ERROR),
    (tb("FloatingPointError: non-finite loss at global step 12"), CrashClass.NAN),
    (tb("MemoryError"), CrashClass.CPU_OOM),
    (tb("core.hero.HeroError: hero.base_model './nope': folder nope does not exist"), CrashClass.OTHER),
])
def test_log_tail_classes(tail, expected):
    crash = classify_exit(1, "INFO starting\n" + tail)
    assert crash.crash_class == expected.value and crash.signal is None
    assert crash.summary == tail.strip().splitlines()[-1]


def test_only_the_last_traceback_counts():
    survived = tb("OSError: [Errno 28] No space left on device")  # a quest error the daemon survived
    crash = classify_exit(1, survived + "INFO quest retried\n" + tb("KeyError: 'cursor'"))
    assert crash.crash_class == CrashClass.OTHER.value and crash.summary == "KeyError: 'cursor'"


def test_sigkill_is_an_oom_kill_only_with_memory_evidence():
    kill = -signal.SIGKILL
    assert classify_exit(kill, "", memory=MemoryFacts(oom_kills_during=1)).crash_class == "cpu_oom"
    assert classify_exit(kill, "", memory=MemoryFacts(oom_kills_during=0, available_bytes=1)).crash_class \
        == "signal"
    low = MemoryFacts(available_bytes=GIB // 100, total_bytes=24 * GIB)   # counter unavailable: heuristics
    assert classify_exit(kill, "", memory=low).crash_class == "cpu_oom"
    big = MemoryFacts(rss_bytes=20 * GIB, available_bytes=4 * GIB, total_bytes=24 * GIB)
    assert classify_exit(kill, "", memory=big).crash_class == "cpu_oom"
    calm = MemoryFacts(rss_bytes=GIB, available_bytes=20 * GIB, total_bytes=24 * GIB)
    crash = classify_exit(kill, "", memory=calm)
    assert crash.crash_class == "signal" and crash.signal == "SIGKILL"
    assert classify_exit(-signal.SIGSEGV).summary == "killed by SIGSEGV"
    assert classify_exit(3, "error: config.json: 1 problem(s)").summary.startswith("error: config.json")
    assert classify_exit(-9, tb("MemoryError"), hang_reason="no heartbeat for 15.0 min").crash_class == "hang"


def test_record_and_list_crashes(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    record_crash(ledger, classify_exit(-9, "", memory=MemoryFacts(oom_kills_during=0), pid=42), global_step=7)
    record_crash(ledger, classify_exit(1, tb("ImportError: cannot import name 'x'"), pid=43))
    crashes = recent_crashes(ledger)
    assert [c["crash_class"] for c in crashes] == ["import_error", "signal"]
    assert crashes[1]["pid"] == 42 and crashes[1]["global_step"] == 7 and crashes[1]["process"] == "daemon"
    assert ledger.events()[0]["level"] == "error" and ledger.events()[0]["kind"] == "crash"


def test_log_tail_and_oom_counter(tmp_path):
    log = tmp_path / "daemon.log"
    log.write_text("old run\n" + "x" * 10 + "\nnew run\n")
    assert read_log_tail(log, start_offset=len("old run\n")).startswith("xxxxxxxxxx\nnew run")
    assert read_log_tail(tmp_path / "missing.log") == ""
    (tmp_path / "vmstat").write_text("pgfault 5\noom_kill 3\n")
    assert read_oom_kill_count(tmp_path / "vmstat") == 3
    assert read_oom_kill_count(tmp_path / "nope") is None


TORCHRUN_REPORT = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File ".../torch/distributed/run.py", line 1019, in run
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
training FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-29_14:36:53
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 10 (pid: 20281)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_14:36:49
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {status} (pid: 20282)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 20282
============================================================
"""
PEER_LOST = """Traceback (most recent call last):
  File "core/engine.py", line 600, in train_quest
RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer.
core.distributed.GroupOutOfSync: rank 0 left quest training (RuntimeError: ...); the group restarts
"""


def test_a_data_parallel_group_is_classified_by_its_root_cause():
    # a rank SIGKILLed: rank 0 lost its peer (its traceback) and the launcher reports the group failed
    killed = classify_exit(1, "step 5 ...\n" + PEER_LOST + TORCHRUN_REPORT.replace("{status}", "-9"))
    assert killed.crash_class == "signal" and killed.summary.startswith("rank 1: killed by SIGKILL")
    assert killed.returncode == 1  # the launcher's own status
    oom = ("Traceback (most recent call last):\n  File \"core/engine.py\"\ntorch.OutOfMemoryError: CUDA out of memory. "
           "Tried to allocate 2.00 GiB\n" + PEER_LOST + TORCHRUN_REPORT.replace("{status}", "10"))
    got = classify_exit(1, oom)
    assert got.crash_class == "cuda_oom" and got.summary.startswith("rank 1: torch.OutOfMemoryError: CUDA out")
    plain = classify_exit(1, PEER_LOST + TORCHRUN_REPORT.replace("{status}", "10"))
    assert plain.crash_class == "other" and plain.summary.startswith("rank 1: ")
