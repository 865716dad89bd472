"""`python -m training enqueue URL` in real processes against a real local HTTP server: a downloaded file
is trained (with its URL and SHA-256 on the quest); a cut or over-sized download exits non-zero with one
sentence and leaves the inbox empty; Hugging Face files come from the cache offline."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from core.ledger import Ledger
from tests.conftest import PYTHON, cli, python_env
from tests.local_http import announce_length, cut_half_way, send_bytes, serve

RECORDS = 24
DATA = b"".join(json.dumps({"text": f"story {i}: a small cat found a red ball"}).encode() + b"\n"
                for i in range(RECORDS))


def inbox_files(realm):
    return sorted(p for p in realm.inbox.rglob("*") if p.is_file())


@pytest.fixture
def server():
    with serve({"/q/stories.jsonl": send_bytes(DATA), "/cut.jsonl": cut_half_way(DATA * 50),
                "/big.jsonl": announce_length(5_000_000)}) as url:
        yield url


@pytest.mark.slow
def test_an_enqueued_url_is_trained_with_its_source_in_the_ledger(make_realm, server):
    realm = make_realm()
    out = cli(realm, "enqueue", f"{server}/q/stories.jsonl", "--priority", "high")
    assert out.returncode == 0, out.stderr
    sha = hashlib.sha256(DATA).hexdigest()
    assert out.stdout.strip().endswith("the daemon validates and queues it") and sha in out.stdout
    assert inbox_files(realm) == [realm.inbox / "high" / "stories.jsonl"]
    done = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "daemon", "--until-idle"],
                          capture_output=True, text=True, timeout=300, env=python_env())
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = Ledger(realm.ledger_path)
    try:
        [quest] = ledger.list_quests()
        assert quest["state"] == "completed" and quest["priority"] == "high"
        assert quest["examples_trained"] == RECORDS and quest["steps"] >= 1
        assert quest["source_url"] == f"{server}/q/stories.jsonl" and quest["source_sha256"] == sha
        assert quest["content_hash"] == sha
    finally:
        ledger.close()


@pytest.mark.parametrize("path,code,sentence", [
    ("/cut.jsonl", 10, "ended after"),
    ("/big.jsonl", 10, "over the limit of 1,000,000 bytes (sources.max_download_bytes)"),
    ("/missing.jsonl", 5, "HTTP 404"),
])
def test_a_failed_download_exits_with_a_sentence_and_an_empty_inbox(make_realm, server, path, code, sentence):
    realm = make_realm(sources={"max_download_bytes": 1_000_000})
    out = cli(realm, "enqueue", server + path)
    assert out.returncode == code, out.stdout + out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and sentence in error[0] and "Traceback" not in out.stderr
    assert inbox_files(realm) == []


def test_unsupported_addresses_are_usage_errors(make_realm):
    realm = make_realm()
    out = cli(realm, "enqueue", "file:///etc/passwd")
    assert out.returncode == 2 and "enqueue PATH" in out.stderr
    out = cli(realm, "enqueue", "ftp://example.org/x.jsonl")
    assert out.returncode == 2 and "https://" in out.stderr
    assert inbox_files(realm) == []


def test_hf_dataset_files_come_from_the_cache_when_offline(make_realm, tmp_path):
    realm = make_realm()
    cache = tmp_path / "hf-cache"
    snapshot = cache / "datasets--owner--stories" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").write_bytes(DATA)
    (cache / "datasets--owner--stories" / "refs").mkdir()
    (cache / "datasets--owner--stories" / "refs" / "main").write_text("c0ffee")
    env = {**python_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}

    def enqueue(url):
        return subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "enqueue", url],
                              capture_output=True, text=True, timeout=120, env=env)

    out = enqueue("hf://datasets/owner/stories/train.jsonl")
    assert out.returncode == 0, out.stderr
    assert (realm.inbox / "normal" / "train.jsonl").read_bytes() == DATA
    out = enqueue("hf://datasets/owner/stories/test.jsonl")
    assert out.returncode == 5 and "HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache" \
        in out.stderr
    assert inbox_files(realm) == [realm.inbox / "normal" / "train.jsonl"]
