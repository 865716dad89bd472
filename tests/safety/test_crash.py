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
