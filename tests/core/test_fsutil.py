"""core.fsutil: atomic writes, file SHA-256 and the exclusive lock, on real files and real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from core import fsutil
from core.fsutil import (
    ExclusiveLock,
    LockHeld,
    atomic_write,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from core.realm import DAEMON_LOCK, PRUNE_LOCK, SUPERVISOR_LOCK, Realm

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# atomic writes -------------------------------------------------------------------------------------
def test_write_json_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": 1, "where": tmp_path})  # default=str: a Path is written as text
    assert json.loads(path.read_text()) == {"a": 1, "where": str(tmp_path)}
    assert path.read_text().endswith("}\n")
    write_json_atomic(path, {"b": "é"}, indent=None, ensure_ascii=False)
    assert path.read_text(encoding="utf-8") == '{"b": "é"}\n'
    assert _leftovers(tmp_path, {"meta.json"}) == []


def test_a_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write("half of the new content")
            f.flush()
            assert fsutil.temporary_sibling(path).exists()  # the write really went somewhere else
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path, {"report.json"}) == []


def test_unserializable_json_fails_before_anything_is_written(tmp_path):
    path = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()}, default=None)
    assert _leftovers(tmp_path, set()) == []


def test_a_failed_rename_leaves_no_temporary(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "inside").write_text("a non-empty folder cannot be replaced by a file")
    with pytest.raises(OSError):
        write_text_atomic(target, "text")
    assert (target / "inside").exists()
    assert _leftovers(tmp_path, {"target"}) == []


def test_the_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "pid"
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_text_atomic(path, "123")
    assert calls == ["fsync", "replace"] and path.read_text() == "123"


def test_binary_mode_and_bad_modes(tmp_path):
    with atomic_write(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "c", "a"):
            pass


def test_the_temporary_file_is_hidden_and_per_writer(tmp_path):
    tmp = fsutil.temporary_sibling(tmp_path / "quest.report.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(".quest.report.json.") and tmp.name.endswith(".tmp")
    names = set()
    t = threading.Thread(target=lambda: names.add(fsutil.temporary_sibling(tmp_path / "x").name))
    t.start()
    t.join()
    assert fsutil.temporary_sibling(tmp_path / "x").name not in names  # another thread, another file


# sha256 --------------------------------------------------------------------------------------------
def test_sha256_file_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom(fsutil.HASH_CHUNK_BYTES * 2 + 123)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


# the exclusive lock ----------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from core.fsutil import ExclusiveLock
    lock = ExclusiveLock(sys.argv[1])
    assert lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin or kills us
""")


@pytest.fixture
def holder(tmp_path):
    """holder(path) -> a child process that holds the lock on ``path`` (it said so) until killed."""
    procs = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_a_lock_held_by_another_process_excludes_us_until_it_dies(tmp_path, holder):
    path = tmp_path / "run" / "daemon.lock"
    proc = holder(path)
    lock = ExclusiveLock(path)
    assert lock.acquire() is False and not lock.held
    with pytest.raises(LockHeld, match="locked by another process"):
        with lock:
            pass
    proc.kill()  # SIGKILL: no cleanup in the holder, the kernel drops its lock
    proc.wait(timeout=10)
    with lock:
        assert lock.held and lock.fd >= 0
    assert not lock.held


def test_a_blocking_acquire_waits_for_the_holder(tmp_path, holder):
    path = tmp_path / "prune.lock"
    proc = holder(path)
    got = []
    lock = ExclusiveLock(path)
    waiter = threading.Thread(target=lambda: got.append(lock.acquire(blocking=True)))
    waiter.start()
    _wait_until_blocked_on(path)
    assert got == []
    proc.stdin.close()  # the holder reads EOF and exits, releasing the lock
    waiter.join(timeout=30)
    assert got == [True] and lock.held
    lock.release()


def _wait_until_blocked_on(path: Path, timeout_seconds: float = 20.0) -> None:
    """Wait until the kernel lists a blocked flock request on ``path`` in /proc/locks (``->`` lines)."""
    inode = f":{os.stat(path).st_ino} "
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
            return
        time.sleep(0.01)
    raise AssertionError(f"nobody waits for the lock on {path}")


def test_two_opens_in_one_process_exclude_each_other(tmp_path):
    first, second = ExclusiveLock(tmp_path / "x.lock"), ExclusiveLock(tmp_path / "x.lock")
    assert first.acquire()
    assert not second.acquire()
    with pytest.raises(RuntimeError, match="held already"):
        first.acquire()
    first.release()
    first.release()  # idempotent
    assert second.acquire()
    second.release()
    with pytest.raises(RuntimeError, match="not held"):
        second.fd  # noqa: B018


def test_the_realm_names_its_lock_files(tmp_path):
    realm = Realm.at(tmp_path)
    assert [realm.lock_file(n).name for n in (DAEMON_LOCK, SUPERVISOR_LOCK, PRUNE_LOCK)] == \
        ["daemon.lock", "supervisor.lock", "prune.lock"]
    assert all(realm.lock_file(n).parent == realm.run_dir for n in (DAEMON_LOCK, PRUNE_LOCK))
    with pytest.raises(ValueError, match="unknown lock"):
        realm.lock_file("../etc/passwd")


def test_a_restore_is_refused_while_a_daemon_process_holds_the_daemon_lock(tmp_path, holder):
    """management.versions and the daemon take the same lock file, named once in core.realm."""
    from core.config import RealmConfig
    from core.ledger import Ledger
    from management import versions
    from management.vault_ops import VaultOpsError

    realm = Realm.at(tmp_path / "realm")
    realm.ensure_layout()
    version = versions.versions_dir(realm, "hero") / "v1"
    version.mkdir(parents=True)
    (version / "SHA256SUMS").write_text("")
    holder(realm.lock_file(DAEMON_LOCK))
    ledger = Ledger(realm.ledger_path)
    try:
        with pytest.raises(VaultOpsError, match="daemon is running"):
            versions.restore(realm, RealmConfig(), ledger, "v1")
    finally:
        ledger.close()
