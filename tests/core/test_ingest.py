import os
import time

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from core.config import IngestConfig
from core.ingest import CloseTracker, InboxScanner, InboxWatcher, is_temporary_name, priority_for
from core.realm import init_realm


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_temporary_names():
    for name in (".hidden.jsonl", "a.jsonl.tmp", "a.jsonl.part", "a.partial", "x.jsonl.crdownload"):
        assert is_temporary_name(name)
    assert not is_temporary_name("a.jsonl")


def test_priority_from_folder_or_prefix(tmp_path):
    inbox = tmp_path / "inbox"
    assert priority_for(inbox / "high" / "a.jsonl", inbox) == "high"
    assert priority_for(inbox / "low_a.jsonl", inbox) == "low"
    assert priority_for(inbox / "HIGH_a.jsonl", inbox) == "high"
    assert priority_for(inbox / "a.jsonl", inbox) == "normal"


def test_settles_only_when_size_and_mtime_stable(tmp_path):
    realm = init_realm(tmp_path)
    clock = FakeClock()
    scanner = InboxScanner(realm, IngestConfig(settle_seconds=1.0), clock=clock)
    f = realm.inbox / "data.jsonl"
    f.write_text('{"text": "a"}\n')
    assert scanner.scan() == []            # first sighting
    clock.now += 0.5
    with open(f, "a") as fh:               # still being written
        fh.write('{"text": "b"}\n')
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert scanner.scan() == []
    clock.now += 0.9
    assert scanner.scan() == []            # 0.9 s since the last change
    clock.now += 0.2
    assert scanner.scan() == [(f, "normal")]


def test_ignores_temporary_and_nested(tmp_path):
    realm = init_realm(tmp_path)
    (realm.inbox / "x.jsonl.part").write_text("")
    (realm.inbox / "sub").mkdir()
    (realm.inbox / "sub" / "y.jsonl").write_text("")
    (realm.inbox / "low" / "z.jsonl").write_text("")
    scanner = InboxScanner(realm, IngestConfig(settle_seconds=0))
    assert scanner.scan() == [(realm.inbox / "low" / "z.jsonl", "low")]


def test_watcher_wakes_on_a_new_file(tmp_path):
    realm = init_realm(tmp_path)
    watcher = InboxWatcher(realm, IngestConfig())
    watcher.start()
    try:
        assert watcher.mode in ("events", "polling")
        (realm.inbox / "a.jsonl").write_text("x")
        assert watcher.wait(5.0)
    finally:
        watcher.stop()


def test_polling_fallback_wakes_too(tmp_path):
    realm = init_realm(tmp_path)
    watcher = InboxWatcher(realm, IngestConfig(use_polling=True, poll_interval_seconds=0.2))
    watcher.start()
    try:
        assert watcher.mode == "polling"
        time.sleep(0.3)
        (realm.inbox / "a.jsonl").write_text("x")
        assert watcher.wait(5.0)
    finally:
        watcher.stop()


def test_close_tracker_needs_every_handle_closed_and_nothing_since():
    clock = FakeClock()
    t = CloseTracker(clock=clock)
    t.note(FileOpenedEvent("/in/a.jsonl"))    # the writer
    t.note(FileOpenedEvent("/in/a.jsonl"))    # a reader
    t.note(FileClosedNoWriteEvent("/in/a.jsonl"))
    assert t.closed_at("/in/a.jsonl") is None  # the writer still holds it
    t.note(FileClosedEvent("/in/a.jsonl"))
    assert t.closed_at("/in/a.jsonl") == clock.now
    t.note(FileOpenedEvent("/in/a.jsonl"))    # reopened to append: not complete any more
    assert t.closed_at("/in/a.jsonl") is None
    t.note(FileClosedEvent("/in/a.jsonl"))
    t.note(FileModifiedEvent("/in/a.jsonl"))  # written by a handle opened before the watch
    assert t.closed_at("/in/a.jsonl") is None
    t.note(FileMovedEvent("/in/b.jsonl.part", "/in/b.jsonl"))  # renamed into place when done
    assert t.closed_at("/in/b.jsonl") == clock.now


def test_a_closed_file_settles_at_once_a_file_held_open_does_not(tmp_path):
    realm = init_realm(tmp_path)
    config = IngestConfig(settle_seconds=30.0)  # the settle interval alone would take 30 s
    watcher = InboxWatcher(realm, config)
    watcher.start()
    try:
        if watcher.mode != "events":
            import pytest

            pytest.skip("inotify events are unavailable here")
        scanner = InboxScanner(realm, config, closed_at=watcher.closed_at)
        held = open(realm.inbox / "held.jsonl", "w")
        held.write('{"text": "a"}\n')
        held.flush()
        (realm.inbox / "done.jsonl").write_text('{"text": "b"}\n')
        deadline = time.monotonic() + 5
        taken = []
        while time.monotonic() < deadline and not taken:
            watcher.wait(0.5)
            taken = scanner.scan()
        assert taken == [(realm.inbox / "done.jsonl", "normal")]
        held.write('{"text": "c"}\n')
        held.close()
        deadline = time.monotonic() + 5
        taken = []
        while time.monotonic() < deadline and not taken:
            watcher.wait(0.5)
            taken = [t for t in scanner.scan() if t[0].name == "held.jsonl"]
        assert taken and (realm.inbox / "held.jsonl").read_text().count("\n") == 2
    finally:
        watcher.stop()


def test_close_write_fast_path_can_be_turned_off(tmp_path):
    from core.ingest import CloseTracker

    realm = init_realm(tmp_path)
    clock = FakeClock()
    f = realm.inbox / "a.jsonl"
    f.write_text("x\n")
    for fast, expected_after_grace in ((True, [(f, "normal")]), (False, [])):
        tracker = CloseTracker(clock=clock)
        scanner = InboxScanner(realm, IngestConfig(settle_seconds=5.0, close_write_fast_path=fast), clock=clock,
                               closed_at=tracker.closed_at)
        assert scanner.scan() == []
        tracker._closed[str(f)] = clock.now
        clock.now += 0.2
        assert scanner.scan() == expected_after_grace


def test_a_file_held_open_for_writing_is_not_taken_however_long_it_is_still(tmp_path):
    from core.ingest import open_for_writing

    realm = init_realm(tmp_path)
    clock = FakeClock()
    scanner = InboxScanner(realm, IngestConfig(settle_seconds=1.0), clock=clock)
    held, read = realm.inbox / "held.jsonl", realm.inbox / "read.jsonl"
    read.write_text('{"text": "b"}\n')
    with open(held, "w") as writer, open(read) as reader:
        writer.write('{"text": "a"}\n')
        writer.flush()
        assert open_for_writing([held, read]) == {held}  # a reader does not hold a file back
        assert scanner.scan() == []
        clock.now += 60  # the writer pauses far longer than settle_seconds
        assert scanner.scan() == [(read, "normal")]
        assert reader.read()
    clock.now += 0.1
    assert scanner.scan() == [(held, "normal"), (read, "normal")]  # closed: complete


def test_entries_that_are_not_files_are_strays_once_settled(tmp_path):
    realm = init_realm(tmp_path)
    clock = FakeClock()
    scanner = InboxScanner(realm, IngestConfig(settle_seconds=1.0), clock=clock)
    os.mkfifo(realm.inbox / "pipe.jsonl")
    (realm.inbox / "dir.jsonl").mkdir()
    (realm.inbox / "low" / "sub").mkdir()
    (realm.inbox / ".hidden").mkdir()  # hidden: ignored, as hidden files are
    (realm.inbox / "data.jsonl").write_text("x\n")
    assert scanner.strays() == []  # first sighting
    clock.now += 1.0
    assert scanner.strays() == [realm.inbox / "dir.jsonl", realm.inbox / "low" / "sub", realm.inbox / "pipe.jsonl"]
    assert scanner.pending() == 4  # the strays and data.jsonl, not the priority folders
