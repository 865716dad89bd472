"""Concurrent ingest (issue 4 acceptance): 1,000 files dropped by 4 writer threads into a running
daemon's inbox -- some written slowly in chunks (pauses shorter than settle_seconds), some reusing the
names of files still waiting in the inbox -- are each accounted for exactly once, none truncated.

Training is paused through the control channel, so the daemon's ingest thread (admit + validate) is what
runs; training many quests is covered by tests/core/test_daemon.py.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import pytest

from tests.core.test_daemon import DaemonThread

FILES = 1000
WRITERS = 4
SHARED_NAMES = 12


def _write(path, lines: list[str], slow: bool) -> None:
    """Create ``path`` exclusively (waiting while a file of that name is still in the inbox) and write it."""
    while True:
        try:
            f = open(path, "x", encoding="utf-8")
            break
        except FileExistsError:
            time.sleep(0.02)
    with f:
        for line in lines:
            f.write(line)
            if slow:  # a slow copy: chunks with pauses shorter than settle_seconds, file held open
                f.flush()
                time.sleep(0.1)


@pytest.mark.slow
def test_1000_files_from_4_writers_each_accounted_for_once(make_realm):
    realm = make_realm(ingest={"settle_seconds": 0.3})
    written: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        try:
            for i in range(FILES // WRITERS):
                n = rng.choice((1, 2))
                lines = [json.dumps({"text": f"writer {w} file {i} record {k} " + "x" * rng.randrange(40)}) + "\n"
                         for k in range(n)]
                shared = rng.random() < 0.1
                name = f"shared-{rng.randrange(SHARED_NAMES)}.jsonl" if shared else f"w{w}-{i:04d}.jsonl"
                _write(realm.inbox / name, lines, slow=rng.random() < 0.05)
                with lock:
                    written.append("".join(lines))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with DaemonThread(realm) as d:
        d.ledger.send_command("pause")
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "paused", what="paused")
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(written) == FILES
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not d.error and not (
                d.ledger.queue_counts()["validating"] == 0 and sum(d.ledger.queue_counts().values()) >= FILES):
            time.sleep(0.1)
        quests = d.ledger.list_quests(limit=10 * FILES)
    assert Counter(q["state"] for q in quests) == {"queued": FILES}
    stored = []
    for q in quests:
        content = (realm.queue_dir(q["priority"]) / q["stored_name"]).read_text(encoding="utf-8")
        assert q["records"] == content.count("\n") and q["bad_records"] == 0
        stored.append(content)
    assert Counter(stored) == Counter(written)  # each file once, whole (none truncated, none lost)
    assert len({q["content_hash"] for q in quests}) == FILES
