"""``python -m training enqueue URL [--priority P]``: download into the inbox with a progress bar.

The download itself is :func:`core.sources.fetch_into_inbox` (atomic, size-limited, recorded in the
ledger); this module draws the terminal progress bar (tqdm, on stderr, only on a terminal) and maps
failures to exit codes: 2 an unsupported address, 5 no such file, 10 any other failure, 130 interrupted
(Ctrl-C). Every failure prints one sentence and leaves nothing in the inbox.
"""

from __future__ import annotations

import sys

import psutil

from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from core.sources import SourceError, clean_stale_downloads, fetch_into_inbox
from training.cli import ExitCode

EXIT_INTERRUPTED = 130


def enqueue_url(url: str, priority: str, realm: Realm, config: RealmConfig) -> int:
    """Download ``url`` into ``inbox/<priority>/``; prints where it went. Returns the exit code."""
    from tqdm import tqdm

    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    bar = None

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="download",
                       file=sys.stderr, disable=None, dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        clean_stale_downloads(ledger, psutil.pid_exists)
        result = fetch_into_inbox(url, realm.inbox, priority, config=config.sources, ledger=ledger,
                                  progress=progress)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return {"unsupported": ExitCode.USAGE, "not_found": ExitCode.NOT_FOUND}.get(exc.reason, ExitCode.ERROR)
    except KeyboardInterrupt:
        print("error: download interrupted; nothing was kept in the inbox", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
        ledger.close()
    print(f"{url} -> {result.path} ({priority}, {result.size_bytes:,} bytes, sha256 {result.sha256}); "
          "the daemon validates and queues it")
    return ExitCode.OK
