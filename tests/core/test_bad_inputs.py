"""Bad inputs (issue 4 acceptance): over 200 malformed files dropped into a running daemon's inbox ->
no crash (the daemon still trains a good file afterwards), each rejected in queue/failed/ with its reason.

The validator itself is fuzzed with hypothesis in tests/core/test_validation.py.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import Counter

import pytest

from tests.conftest import write_text_quest
from tests.core.test_daemon import DaemonThread

MAX_LINE_BYTES = 4096


def malformed_corpus() -> dict[str, bytes]:
    """File name -> content; every file is malformed (no file has a valid record share above 90%)."""
    out: dict[str, bytes] = {}

    def add(stem: str, content: bytes, ext: str = ".jsonl") -> None:
        out[f"{stem}-{len(out):03d}{ext}"] = content

    for i in range(40):  # invalid JSON
        add("invalid", [b"{", b"not json", b'{"text": "a"', b"{'text': 'single quotes'}", b"[1, 2",
                        b'{"text": "a"} trailing', b"\x00\x00\x00", b"}{"][i % 8] + b"\n" * (i % 3))
    for i, record in enumerate([{"text": 5}, {"text": None}, {"text": ["a"]}, {"prompt": 1, "completion": "x"},
                                {"prompt": "x"}, {"completion": "y"}, {"messages": "hi"},
                                {"messages": [{"role": "user"}]}, {"messages": [{"role": 3, "content": "x"}]},
                                {"messages": []}, {"chosen": 1, "rejected": 2}, {"unknown": "field"}, [1, 2], 7,
                                "just a string", None, True, {"text": {"nested": "object"}},
                                {"messages": [{"role": "wizard", "content": "x"}]}, {"prompt": None, "completion": None}]):
        add("types", (json.dumps(record) + "\n").encode() * (1 + i % 3))
        add("types-mixed", (json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n").encode() * 2)
    for i in range(10):  # mostly valid, but more bad lines than validation.max_bad_line_ratio (10%)
        add("too-many-bad", b'{"text": "good line"}\n' * (8 - i % 4) + b"{bad\n" * 2)
    for i in range(10):  # empty or whitespace only
        add("empty", [b"", b"\n", b"\n\n\n", b"   \n", b"\t\r\n"][i % 5])
    for i in range(15):  # binary
        add("binary", bytes((i * 37 + k * 101) % 256 for k in range(200 + i * 50)), [".jsonl", ".bin", ".json"][i % 3])
    add("gzip-garbage", b"\x1f\x8b\x08\x00garbage", ".jsonl.gz")
    add("gzip-truncated", gzip.compress(b'{"text": "a"}\n' * 100)[:30], ".jsonl.gz")
    for i in range(15):  # non-UTF-8
        add("latin1", json.dumps({"text": "caf\u00e9 " * (i + 1)}, ensure_ascii=False).encode("latin-1") + b"\n")
    for i in range(10):  # BOM with bad records, BOMs in the wrong place
        add("bom", b"\xef\xbb\xbf" + [b'{"text": 5}\n', b"\xef\xbb\xbf{}\n", b"not json\n"][i % 3] * 2)
        add("utf16", '{"text": "a"}\n'.encode("utf-16"))
    for i in range(10):  # CRLF with bad records, lone CRs
        add("crlf", [b'{"text": 1}\r\n' * 3, b'{"text": "a"}\r{"text": "b"}\r', b"\r\n\r\n{]\r\n"][i % 3])
    for i in range(10):  # huge lines (the realm's validation.max_line_bytes is 4 KiB)
        add("huge", json.dumps({"text": "x" * (MAX_LINE_BYTES * (i + 1))}).encode() + b"\n")
    add("huge-no-newline", b'{"text": "' + b"y" * 200_000)
    for i in range(10):  # NaN and infinite numbers
        add("nan", [b'{"text": NaN}\n', b'{"text": Infinity}\n', b'{"prompt": -Infinity, "completion": "x"}\n',
                    b'{"messages": NaN}\n', b"NaN\n"][i % 5] * 2)
    for depth in (100, 1000, 5000, 20000, 100000):  # deep nesting
        add("deep", b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n")
        add("deep-obj", b'{"a":' * depth + b"1" + b"}" * depth + b"\n")
    for name in ("caf\u00e9 \u2615 \u65e5\u672c.jsonl", "with spaces in it.jsonl", "<img src=x onerror=alert(1)>.jsonl",
                 "-leading-dash.jsonl", "--help.jsonl", "'; DROP TABLE quests; --.jsonl", "$(touch pwned).jsonl",
                 "a" * 240 + ".jsonl", "\u202eevil\u202d.jsonl", "tab\tname.jsonl", "new\nline.jsonl",
                 "emoji \U0001f409.jsonl", "percent %s %n.jsonl", "back\\slash.jsonl", "no-extension",
                 "x.json", "x.txt", "x.csv", "x.parquet", "UPPER.JSONL"):
        out[name] = b'{"text": 42}\n'
    out["x.txt"] = b"\x00\x01 binary \xff\xfe"  # '{"text": 42}' is a fine paragraph of plain text
    return out


@pytest.mark.slow
def test_200_malformed_files_are_rejected_with_reasons_and_the_daemon_keeps_training(make_realm, tmp_path):
    realm = make_realm(validation={"max_line_bytes": MAX_LINE_BYTES})
    corpus = malformed_corpus()
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"text": "a file elsewhere"}\n')
    links = {"link-to-file.jsonl": outside, "link-dangling.jsonl": tmp_path / "missing.jsonl",
             "link-to-dir.jsonl": tmp_path, "link-to-etc-passwd.jsonl": "/etc/passwd"}
    assert len(corpus) + len(links) >= 200
    with DaemonThread(realm) as d:
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "idle", what="idle")
        for name, content in corpus.items():
            (realm.inbox / name).write_bytes(content)
        for name, target in links.items():
            os.symlink(target, realm.inbox / name)
        total = len(corpus) + len(links)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not d.error and not (
                len(d.ledger.list_quests(limit=10_000)) >= total and d.ledger.queue_counts()["validating"] == 0):
            time.sleep(0.1)
        quests = d.ledger.list_quests(limit=10_000)
        assert Counter(q["state"] for q in quests) == {"failed": total}, os.listdir(realm.inbox) or [
            (q["name"], q["state"]) for q in quests if q["state"] != "failed"]
        assert sorted(q["name"] for q in quests) == sorted([*corpus, *links])
        for q in quests:
            assert q["error"], q["name"]  # each with its reason
            assert (realm.queue_dir("failed") / q["stored_name"]).exists() or q["name"].startswith("link-"), q
            report = realm.queue_dir("failed") / (q["stored_name"] + ".report.json")
            if not q["name"].startswith("link-"):
                assert json.loads(report.read_text())["reason"], q["name"]
        assert os.listdir(realm.inbox) == [p for p in os.listdir(realm.inbox) if p in ("high", "normal", "low")]
        assert outside.read_text() == '{"text": "a file elsewhere"}\n'  # a link's target is never moved
        write_text_quest(realm.inbox / "good.jsonl", 8)
        d.wait_for(lambda: d.ledger.list_quests(limit=10_000)[-1]["state"] == "completed", what="good file trained")
        assert d.thread.is_alive() and d.error is None
