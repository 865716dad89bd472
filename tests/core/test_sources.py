"""Downloads into the inbox (core.sources) against a real local HTTP server, a real Hugging Face cache
layout and fsspec's in-memory filesystem: atomic publication, size limit, cut connections, names, ledger."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from core.config import SourcesConfig
from core.ledger import DownloadState, Ledger, QuestState
from core.quest_queue import QuestQueue
from core.sources import (
    SourceError,
    check_url,
    clean_stale_downloads,
    fetch_into_inbox,
    parse_hf_url,
    safe_file_name,
)
from tests.local_http import (
    announce_length,
    cut_half_way,
    redirect,
    send_bytes,
    serve,
    stream_without_length,
)

DATA = b"".join(json.dumps({"text": f"line {i}: the quick brown fox"}).encode() + b"\n" for i in range(2000))


def inbox_files(realm) -> list[Path]:
    """Every file under inbox/, hidden ones included."""
    return sorted(p for p in realm.inbox.rglob("*") if p.is_file())


@pytest.fixture
def realm(make_realm):
    return make_realm()


@pytest.fixture
def ledger(realm):
    led = Ledger(realm.ledger_path)
    yield led
    led.close()


@pytest.fixture
def server():
    routes = {
        "/data/file.jsonl": send_bytes(DATA),
        "/cut.jsonl": cut_half_way(DATA),
        "/huge.jsonl": announce_length(10_000_000, b"{}\n"),
        "/endless": stream_without_length(b"x" * 65536, 400),
        "/download": send_bytes(DATA, headers={"Content-Disposition": 'attachment; filename="../named set.jsonl"'}),
        "/moved": redirect("/data/file.jsonl"),
        "/to-file": redirect("file:///etc/passwd"),
    }
    with serve(routes) as url:
        yield url


def test_a_download_is_published_whole_with_its_hash_in_the_ledger(realm, ledger, server):
    seen = []
    got = fetch_into_inbox(f"{server}/data/file.jsonl", realm.inbox, "high", config=SourcesConfig(),
                           ledger=ledger, progress=lambda done, total: seen.append((done, total)))
    assert got.path == realm.inbox / "high" / "file.jsonl" and got.path.read_bytes() == DATA
    assert got.sha256 == hashlib.sha256(DATA).hexdigest() and got.size_bytes == len(DATA)
    assert inbox_files(realm) == [got.path]  # no .part left behind
    assert seen[-1] == (len(DATA), len(DATA))
    row = ledger.get_download(got.download_id)
    assert row["state"] == DownloadState.DONE.value and row["sha256"] == got.sha256
    assert row["path"] == str(got.path) and row["url"] == f"{server}/data/file.jsonl"
    assert ledger.last_event("source_downloaded")["message"].startswith("file.jsonl downloaded")


def test_the_quest_admitted_from_a_download_carries_its_url_and_sha256(realm, ledger, server):
    got = fetch_into_inbox(f"{server}/data/file.jsonl", realm.inbox, config=SourcesConfig(), ledger=ledger)
    plain = realm.inbox / "normal" / "other.jsonl"
    plain.write_bytes(DATA)
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(got.path, "normal")
    other = queue.admit(plain, "normal")
    quest = ledger.get_quest(qid)
    assert quest["state"] == QuestState.VALIDATING.value
    assert (quest["source_url"], quest["source_sha256"]) == (f"{server}/data/file.jsonl", got.sha256)
    assert ledger.get_download(got.download_id)["quest_id"] == qid
    assert ledger.get_quest(other)["source_url"] is None  # a dropped file has no source


def test_names_never_overwrite_and_come_from_content_disposition(realm, server):
    (realm.inbox / "normal" / "file.jsonl").write_text("mine\n")
    first = fetch_into_inbox(f"{server}/data/file.jsonl", realm.inbox, config=SourcesConfig())
    assert first.name == "file-2.jsonl" and (realm.inbox / "normal" / "file.jsonl").read_text() == "mine\n"
    named = fetch_into_inbox(f"{server}/download?id=3", realm.inbox, config=SourcesConfig())
    assert named.name == "named set.jsonl"  # the folder part of the header is dropped
    moved = fetch_into_inbox(f"{server}/moved", realm.inbox, config=SourcesConfig())
    assert moved.name == "moved" and moved.path.read_bytes() == DATA  # redirect followed; name from the URL


@pytest.mark.parametrize("path,reason,words", [
    ("/cut.jsonl", "interrupted", "ended after"),
    ("/huge.jsonl", "too_large", "over the limit"),
    ("/endless", "too_large", "larger than the limit"),
    ("/nope.jsonl", "not_found", "HTTP 404"),
    ("/to-file", "unsupported", "is not http"),
])
def test_failed_downloads_leave_nothing_in_the_inbox(realm, ledger, server, path, reason, words):
    config = SourcesConfig(max_download_bytes=1_000_000)
    with pytest.raises(SourceError, match=words) as info:
        fetch_into_inbox(server + path, realm.inbox, config=config, ledger=ledger)
    assert info.value.reason == reason
    assert inbox_files(realm) == []
    row = ledger.list_downloads()[0]
    assert row["state"] == DownloadState.FAILED.value and words in row["error"]
    assert ledger.last_event("source_failed") is not None


def test_a_stop_request_interrupts_and_cleans_up(realm, server):
    with pytest.raises(SourceError, match="stopped") as info:
        fetch_into_inbox(f"{server}/data/file.jsonl", realm.inbox, config=SourcesConfig(),
                         should_stop=lambda: True)
    assert info.value.reason == "interrupted" and inbox_files(realm) == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.jsonl", "javascript:alert(1)",
                                 "/etc/passwd", "data.jsonl", "http:///nohost", "gopher://x/y"])
def test_only_http_hf_s3_gs_are_accepted(url, realm):
    with pytest.raises(SourceError) as info:
        fetch_into_inbox(url, realm.inbox, config=SourcesConfig())
    assert info.value.reason == "unsupported"
    assert inbox_files(realm) == []


def test_check_url_names_the_schemes():
    assert [check_url(u) for u in ("https://a.org/x", "HTTP://a.org/x", "hf://datasets/o/n/f.jsonl",
                                   "s3://bucket/key", "gs://bucket/key")] == ["https", "http", "hf", "s3", "gs"]
    with pytest.raises(SourceError, match="enqueue PATH"):
        check_url("file:///tmp/x.jsonl")


@pytest.mark.parametrize("raw,expected", [
    ("data.jsonl", "data.jsonl"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\win.jsonl", "win.jsonl"),
    (".hidden.jsonl", "hidden.jsonl"),
    ("a\x00b\nc.jsonl", "abc.jsonl"),
    ("half.jsonl.part", "half.jsonl.part.download"),  # the ingest would ignore a .part name forever
    ("..", None), ("", None), (None, None), ("/", None),
])
def test_safe_file_name(raw, expected):
    assert safe_file_name(raw) == expected


def test_long_names_are_shortened_keeping_the_suffix():
    name = safe_file_name("é" * 300 + ".jsonl.gz")
    assert name.endswith(".jsonl.gz") and len(name.encode()) <= 200


def test_hf_urls_parse_and_bad_ones_say_how():
    assert parse_hf_url("hf://datasets/owner/name/data/train.jsonl") == ("owner/name", "data/train.jsonl", None)
    assert parse_hf_url("hf://datasets/owner/name@v1.0/t.jsonl") == ("owner/name", "t.jsonl", "v1.0")
    for bad in ("hf://owner/name/t.jsonl", "hf://datasets/owner/name", "hf://models/o/n/f"):
        with pytest.raises(SourceError, match="hf://datasets/OWNER/NAME/PATH"):
            parse_hf_url(bad)


def test_hf_files_come_from_the_cache_when_offline(realm, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / "datasets--owner--name" / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.jsonl").write_bytes(DATA)
    (cache / "datasets--owner--name" / "refs").mkdir()
    (cache / "datasets--owner--name" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got = fetch_into_inbox("hf://datasets/owner/name/data/train.jsonl", realm.inbox, config=SourcesConfig())
    assert got.name == "train.jsonl" and got.path.read_bytes() == DATA
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE is set and the file is not in the local") as info:
        fetch_into_inbox("hf://datasets/owner/name/data/missing.jsonl", realm.inbox, config=SourcesConfig())
    assert info.value.reason == "not_found"
    with pytest.raises(SourceError, match="over the limit"):
        fetch_into_inbox("hf://datasets/owner/name/data/train.jsonl", realm.inbox,
                         config=SourcesConfig(max_download_bytes=100))
    assert inbox_files(realm) == [got.path]


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed here")
def test_s3_without_its_backend_names_the_package(realm):
    with pytest.raises(SourceError, match=r"s3fs package: pip install 'realm-of-training\[cloud\]'") as info:
        fetch_into_inbox("s3://bucket/data.jsonl", realm.inbox, config=SourcesConfig())
    assert info.value.reason == "unsupported" and inbox_files(realm) == []


def test_fsspec_sources_stream_with_the_same_rules(realm, monkeypatch):
    """The s3/gs path, run on fsspec's in-memory filesystem (no cloud here): size from the backend, limit,
    missing files."""
    import fsspec

    import core.sources as sources

    monkeypatch.setitem(sources._FETCHERS, "memory", sources._fetch_fsspec)
    monkeypatch.setattr(sources, "SCHEMES", (*sources.SCHEMES, "memory"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/dir/set.jsonl", DATA)
    try:
        got = fetch_into_inbox("memory://bucket/dir/set.jsonl", realm.inbox, config=SourcesConfig())
        assert got.name == "set.jsonl" and got.path.read_bytes() == DATA
        with pytest.raises(SourceError, match="over the limit"):
            fetch_into_inbox("memory://bucket/dir/set.jsonl", realm.inbox, config=SourcesConfig(max_download_bytes=10))
        with pytest.raises(SourceError, match="no such file"):
            fetch_into_inbox("memory://bucket/dir/none.jsonl", realm.inbox, config=SourcesConfig())
        assert inbox_files(realm) == [got.path]
    finally:
        fs.rm("/bucket", recursive=True)


def test_downloads_of_a_dead_process_are_cleaned(realm, ledger):
    part = realm.inbox / "normal" / ".fetch-deadbeef.part"
    part.write_bytes(b"half")
    download_id = ledger.start_download("https://example.org/x.jsonl", "normal", str(part), pid=999_999_999)
    assert clean_stale_downloads(ledger, alive=lambda pid: pid != 999_999_999) == 1
    assert not part.exists()
    row = ledger.get_download(download_id)
    assert row["state"] == "failed" and "interrupted" in row["error"]
    assert clean_stale_downloads(ledger, alive=lambda pid: False) == 0
