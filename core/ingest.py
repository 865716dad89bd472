"""Watching ``inbox/``: find files that are complete and hand them over, once each.

A watchdog observer (inotify on Linux) wakes the scanner on any change; a polling observer replaces it
where events are unavailable (``ingest.use_polling`` or when inotify cannot start), and a rescan every
``ingest.poll_interval_seconds`` is the safety net either way.

A file is *settled* -- safe to take -- when its name is not a temporary one (leading ``.``, or ending
``.tmp``, ``.part``, ``.partial``, ``.crdownload``, ``.swp``) and its size and mtime have not changed for
``ingest.settle_seconds``. So a file still being copied in is never read half-written.

With inotify events there is a faster proof of completeness: the writer *closed* the file
(``IN_CLOSE_WRITE``), or it was renamed into place, and nobody has it open any more (opens and closes
seen since the watch started balance) and nothing touched it for :data:`CLOSE_GRACE_SECONDS` (a writer
that reopens the file at once to append cancels it). Such a file settles after that grace instead of
``settle_seconds`` (:class:`CloseTracker`). A file held open while it is written -- the slow writer --
never has that proof until it is closed. Where events are unavailable (polling), or for a file written
before the watch began, only the settle interval applies. A writer that closes and reopens a file to
append, pausing longer than the grace between appends, should write under a temporary name (e.g.
``.part``) and rename it when done, as downloaders and ``rsync`` do.

Whatever the timing, a file that some process holds open for writing is not taken
(:func:`open_for_writing`: the open file table, through psutil) -- the writer that pauses longer than
``settle_seconds`` with the file still open. Where that table cannot be read (another user's process),
the settle interval applies, and :func:`core.records.verify_unchanged` still catches a file that changed
after validation before a line of it trains.

Entries that are not files -- a directory (other than the priority folders), a FIFO, a socket, a device
-- are never opened; :meth:`InboxScanner.strays` reports them once settled, and the daemon rejects them
with a report.

Priority: ``inbox/high/``, ``inbox/normal/``, ``inbox/low/`` subfolders, or a ``high_`` / ``low_`` file
name prefix; default ``normal``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from core.config import IngestConfig
from core.realm import PRIORITIES, Realm

TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
CLOSE_GRACE_SECONDS = 0.15
"""After a close-write (or a rename into place), seconds without an open or change before the file is taken."""
MOVE_PAIRING_SECONDS = 0.05
"""watchdog holds every inotify event queued behind an unpaired ``IN_MOVED_FROM`` -- a file leaving the
inbox: every admitted quest -- for 0.5 s, to pair it with its ``IN_MOVED_TO``. The kernel emits both halves
of a rename together, so the inbox observer pairs within this shorter window."""

log = logging.getLogger("realm.ingest")


def is_temporary_name(name: str) -> bool:
    """True for names a writer is still using (hidden files, ``.tmp``/``.part``/``.partial``...)."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


def priority_for(path: Path, inbox: Path) -> str:
    """``high``/``normal``/``low`` from the inbox subfolder, else from a ``high_``/``low_`` name prefix."""
    parent = path.parent.name if path.parent != inbox else ""
    if parent in PRIORITIES:
        return parent
    lower = path.name.lower()
    if lower.startswith("high_"):
        return "high"
    if lower.startswith("low_"):
        return "low"
    return "normal"


def open_for_writing(paths: Iterable[Path]) -> set[Path]:
    """The ``paths`` that some process has open for writing (``w``/``a``/``r+``...), from the open file
    table of every process this one may inspect (psutil: ``/proc/<pid>/fd`` and ``fdinfo`` on Linux;
    processes of other users are skipped unless we are root). Costs a few milliseconds per call."""
    by_path: dict[str, Path] = {}
    for p in paths:
        by_path[os.path.realpath(p)] = p
    found: set[Path] = set()
    if not by_path:
        return found
    for proc in psutil.process_iter():
        try:
            files = proc.open_files()
        except (psutil.Error, OSError):  # gone, or not ours to inspect
            continue
        for f in files:
            p = by_path.get(f.path)
            if p is not None and getattr(f, "mode", "w") != "r":  # no mode on some platforms: assume writing
                found.add(p)
    return found


def entry_kind(st: os.stat_result) -> str:
    """``"file"``, ``"directory"``, ``"FIFO"``, ``"socket"``, ``"device"``, ``"symbolic link"``."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


class InboxScanner:
    """Tracks candidate files in the inbox and reports the settled ones.

    Not thread-safe on its own: one thread calls :meth:`scan`.
    """

    def __init__(self, realm: Realm, config: IngestConfig, clock=time.monotonic,
                 closed_at: Callable[[Path], float | None] | None = None,
                 writers: Callable[[list[Path]], set[Path]] = open_for_writing):
        """``closed_at(path)``: when the file was last closed after writing with nobody holding it open
        since (``clock`` time), else None -- e.g. :meth:`InboxWatcher.closed_at`; None: settle time only.
        ``writers(paths)``: those of ``paths`` a process holds open for writing (never taken)."""
        self.realm = realm
        self.config = config
        self.clock = clock
        self.closed_at = closed_at
        self.writers = writers
        self._seen: dict[Path, _Seen] = {}
        self._strays: dict[Path, _Seen] = {}

    def _entries(self) -> list[tuple[os.DirEntry, bool]]:
        """``(entry, in a priority folder)`` for every visible entry of inbox/ and its priority folders."""
        out = []
        for folder in (self.realm.inbox, *(self.realm.inbox / p for p in PRIORITIES)):
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            out.extend((e, folder != self.realm.inbox) for e in entries if not is_temporary_name(e.name))
        return out

    def candidates(self) -> list[Path]:
        """Files (or symlinks) directly in inbox/ or in its priority subfolders, temporary names excluded."""
        out: list[Path] = []
        for entry, _ in self._entries():
            try:
                if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                    out.append(Path(entry.path))
            except OSError:
                continue
        return sorted(out)

    def strays(self) -> list[Path]:
        """Entries that are neither files nor symlinks (directories other than the priority folders --
        also one named ``*.jsonl`` --, FIFOs, sockets, devices) whose mtime has not changed for
        ``settle_seconds``: quests are files, so each is rejected with a report. Never opens them."""
        now = self.clock()
        out: list[Path] = []
        present = set()
        for entry, nested in self._entries():
            path = Path(entry.path)
            try:
                if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                    continue
                if not nested and entry.name in PRIORITIES and entry.is_dir(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            present.add(path)
            seen = self._strays.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._strays[path] = seen = _Seen(st.st_size, st.st_mtime_ns, now)
            if now - seen.stable_since >= self.config.settle_seconds:
                out.append(path)
        for gone in set(self._strays) - present:
            del self._strays[gone]
        return sorted(out)

    def scan(self, defer: Callable[[Path], bool] | None = None) -> list[tuple[Path, str]]:
        """Return ``(path, priority)`` for every settled file: high, normal, then low priority, each oldest
        sighting (or close) first, so that of files settling together the urgent one is queued first.
        ``defer(path)``: True leaves a settled file out this time (e.g. waiting to be retried)."""
        now = self.clock()
        settled: list[tuple[float, Path]] = []
        present = set()
        for path in self.candidates():
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            present.add(path)
            closed = self.closed_at(path) if self.closed_at is not None else None
            if (self.config.close_write_fast_path and closed is not None
                    and now - closed >= min(CLOSE_GRACE_SECONDS, self.config.settle_seconds)):
                settled.append((closed, path))  # closed by its writer, untouched since: complete
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
                if self.config.settle_seconds > 0:
                    continue
                seen = self._seen[path]
            if now - seen.stable_since >= self.config.settle_seconds:
                settled.append((seen.stable_since, path))
        for gone in set(self._seen) - present:
            del self._seen[gone]
        if defer is not None:
            settled = [(t, p) for t, p in settled if not defer(p)]
        if settled:
            busy = self.writers([p for _, p in settled])  # a writer that paused with the file open
            settled = [(t, p) for t, p in settled if p not in busy]
        rank = {p: i for i, p in enumerate(PRIORITIES)}
        ordered = sorted((rank.get(priority_for(p, self.realm.inbox), len(rank)), t, p) for t, p in settled)
        return [(p, priority_for(p, self.realm.inbox)) for _, _, p in ordered]

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)
        self._strays.pop(path, None)

    def pending(self) -> int:
        """How many entries wait in the inbox now (files settled or not, and entries that are not files)."""
        return sum(1 for entry, nested in self._entries()
                   if nested or entry.name not in PRIORITIES or not entry.is_dir(follow_symlinks=False))


class CloseTracker:
    """Which inbox files were closed by their writer and not opened or changed since (thread-safe).

    Fed with watchdog's inotify events: ``opened`` / ``closed`` (close-write) / ``closed_no_write`` keep
    a count of open handles per path (handles opened before the watch are unseen: their writes still
    show as ``modified``), ``modified``/``attrib``/``created`` clear the mark, ``moved`` carries it to the
    new name (a rename into the inbox marks the file as closed), ``deleted`` forgets it.
    """

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._closed: dict[str, float] = {}

    def note(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        kind, path = event.event_type, str(event.src_path)
        now = self.clock()
        with self._lock:
            if kind == "opened":
                self._open[path] = self._open.get(path, 0) + 1
                self._closed.pop(path, None)
            elif kind in ("closed", "closed_no_write"):
                left = self._open.pop(path, 0) - 1
                if left > 0:
                    self._open[path] = left
                    self._closed.pop(path, None)
                elif kind == "closed":
                    self._closed[path] = now
            elif kind in ("modified", "attrib", "created"):
                self._closed.pop(path, None)
            elif kind == "moved":
                dest = str(getattr(event, "dest_path", "") or "")
                handles = self._open.pop(path, 0)
                self._closed.pop(path, None)
                if dest:
                    if handles > 0:
                        self._open[dest] = handles
                    else:
                        self._closed[dest] = now
            elif kind == "deleted":
                self._open.pop(path, None)
                self._closed.pop(path, None)

    def closed_at(self, path: Path | str) -> float | None:
        """When ``path`` was closed after writing (or renamed into place), if not opened or changed since."""
        with self._lock:
            return self._closed.get(str(path))


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event, tracker: CloseTracker | None = None):
        self.event = event
        self.tracker = tracker

    def on_any_event(self, event: FileSystemEvent) -> None:
        if self.tracker is not None:
            self.tracker.note(event)
            if event.event_type in ("closed", "moved") and not event.is_directory:
                # wake again once the close grace has passed, so the file is taken without waiting a poll
                timer = threading.Timer(CLOSE_GRACE_SECONDS + 0.01, self.event.set)
                timer.daemon = True
                timer.start()
        self.event.set()


class InboxWatcher:
    """Wakes whoever waits in :meth:`wait` when something changes in the inbox.

    Uses inotify through watchdog's :class:`Observer`; falls back to :class:`PollingObserver` when
    ``use_polling`` is set or the native observer fails to start (e.g. inotify watch limits).
    """

    def __init__(self, realm: Realm, config: IngestConfig):
        self.realm = realm
        self.config = config
        self.wake = threading.Event()
        self.observer = None
        self.mode = "none"
        self.tracker: CloseTracker | None = None

    def closed_at(self, path: Path | str) -> float | None:
        """See :meth:`CloseTracker.closed_at`; always None without inotify events (polling, rescan only)."""
        return self.tracker.closed_at(path) if self.tracker is not None and self.mode == "events" else None

    def start(self) -> None:
        try:  # see MOVE_PAIRING_SECONDS; read when the observer's watch is created
            from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

            InotifyMoveEventGrouper.delay = min(InotifyMoveEventGrouper.delay, MOVE_PAIRING_SECONDS)
        except ImportError:  # another platform or watchdog version: its own default
            pass
        kinds = [PollingObserver] if self.config.use_polling else [Observer, PollingObserver]
        for kind in kinds:
            tracker = CloseTracker() if kind is not PollingObserver else None
            handler = _Wake(self.wake, tracker)
            observer = kind(timeout=self.config.poll_interval_seconds) if kind is PollingObserver else kind()
            try:
                observer.schedule(handler, str(self.realm.inbox), recursive=True)
                observer.start()
            except OSError as exc:  # inotify limits, unsupported filesystem
                log.warning("inbox observer %s failed (%s); falling back", kind.__name__, exc)
                continue
            self.observer = observer
            self.tracker = tracker
            self.mode = "polling" if kind is PollingObserver else "events"
            log.info("watching %s (%s)", self.realm.inbox, self.mode)
            return
        self.mode = "rescan-only"

    def wait(self, timeout_seconds: float) -> bool:
        """Block until a change or ``timeout_seconds``; returns True when woken by a change."""
        woke = self.wake.wait(timeout_seconds)
        self.wake.clear()
        return woke

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
