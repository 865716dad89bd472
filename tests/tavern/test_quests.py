"""The quests page: API on a real realm (SQLite ledger, queue folders, the real validator), safe uploads,
previews, path traversal, and a real browser for escaping and the screenshot."""

from __future__ import annotations

import gzip
import io
import json
import os

import pytest

from core.config import RealmConfig
from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue
from core.validation import validate_file, write_report
from tavern.app import close_app, create_app
from tavern.pages import quest_files
from tavern.pages.quest_files import (
    PREVIEW_BUDGET_BYTES,
    PREVIEW_LINE_CHARS,
    UploadError,
    check_upload_name,
    read_preview,
    save_upload,
)
from tests.tavern.conftest import save_screenshot

ORIGIN = {"Origin": "http://localhost"}
UPLOAD_LIMIT = 4096
XSS_NAME = "<img src=x onerror=alert(1)>.jsonl"
TEXT_LINES = [json.dumps({"text": f"Once upon a time {i}"}) for i in range(8)]
PREF_LINES = [json.dumps({"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: no"})] * 3


# fixtures and helpers -------------------------------------------------------------------------------
@pytest.fixture
def qrealm(make_realm):
    return make_realm("quests_realm", tavern={"max_upload_bytes": UPLOAD_LIMIT})


@pytest.fixture
def qapp(qrealm):
    app = create_app(qrealm, testing=True)
    yield app
    close_app(app)


@pytest.fixture
def client(qapp):
    """The test client of an app whose upload limit is small (overrides the conftest ``client``)."""
    return qapp.test_client()


@pytest.fixture
def daemon_ledger(qrealm):
    """A second ledger connection, as the daemon process has."""
    ledger = Ledger(qrealm.ledger_path)
    yield ledger
    ledger.close()


def add_quest(realm, ledger, name, lines, priority="normal", gz=False, tmp=None):
    """Admit and validate a file the way the daemon does (real validator, report beside the file)."""
    src = (tmp or realm.root) / f"drop-{name.replace('/', '_')}"
    data = ("\n".join(lines) + "\n").encode()
    src.write_bytes(gzip.compress(data) if gz else data)
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(src, priority, name=name)
    quest = ledger.get_quest(qid)
    report = validate_file(queue.path_of(quest), display_name=name, config=RealmConfig())
    write_report(report, queue.report_path_of(quest))
    info = report.to_dict()
    fields = dict(format=info["format"], records=info["lines"], bad_records=info["records_bad"],
                  examples_total=info["records_valid"], content_hash=info["content_hash"])
    if info["accepted"]:
        queue.transition(qid, QuestState.QUEUED, **fields)
    else:
        queue.transition(qid, QuestState.FAILED, error=info["reason"], **fields)
    return qid


def fail_in_training(realm, ledger, qid, attempts=3):
    queue = QuestQueue(realm, ledger)
    queue.transition(qid, QuestState.PROCESSING)
    queue.transition(qid, QuestState.FAILED, attempts=attempts, error="RuntimeError: boom")


def post(client, url, **kw):
    return client.post(url, headers=ORIGIN, **kw)


def quests_by_id(client):
    return {q["id"]: q for q in client.get("/api/quests").get_json()["quests"]}


# the board --------------------------------------------------------------------------------------------
def test_board_lists_quests_by_state_with_counts_and_schools(client, qrealm, daemon_ledger):
    a = add_quest(qrealm, daemon_ledger, "stories.jsonl", TEXT_LINES, "high")
    b = add_quest(qrealm, daemon_ledger, "hh.jsonl", PREF_LINES, "low")
    c = add_quest(qrealm, daemon_ledger, "broken.jsonl", ["{not json"] * 5)
    d = add_quest(qrealm, daemon_ledger, "crashy.jsonl", TEXT_LINES)
    fail_in_training(qrealm, daemon_ledger, d)
    data = client.get("/api/quests").get_json()
    counts = data["counts"]
    assert counts["queued"] == 2 and counts["queued_high"] == 1 and counts["queued_low"] == 1
    assert counts["failed"] == 2 and counts["waiting"] == 0 and counts["processing"] == 0
    q = {x["id"]: x for x in data["quests"]}
    assert q[a]["state"] == "queued" and q[a]["format"] == "text" and q[a]["examples_total"] == 8
    assert q[a]["waiting_for"] is None and q[a]["actions"] == ["priority", "remove"]
    assert q[b]["format"] == "preference_implicit" and q[b]["waiting_for"] is None
    assert (q[a]["school"], q[b]["school"], q[b]["school_title"]) == ("sft", "dpo", "Judge")
    assert q[c]["failure"] == "validation" and q[c]["actions"] == ["remove"] and q[c]["error"]
    assert q[d]["failure"] == "training" and q[d]["actions"] == ["retry", "remove"]
    assert "stored_name" not in q[a] and "report_path" not in q[a]  # no server paths leak into the board
    # a daemon that trains fewer formats (an older one) says so: those quests wait for their school
    daemon_ledger.set_value("daemon", {"state": "idle", "trainable_formats": ["text"]})
    data = client.get("/api/quests").get_json()
    assert data["counts"]["waiting"] == 1
    assert {x["id"]: x["waiting_for"] for x in data["quests"]}[b] == "DPO"


def test_detail_has_report_and_escaped_preview_of_plain_and_gzip_files(client, qrealm, daemon_ledger):
    plain = add_quest(qrealm, daemon_ledger, "plain.jsonl", TEXT_LINES)
    packed = add_quest(qrealm, daemon_ledger, "packed.jsonl.gz", TEXT_LINES, gz=True)
    for qid in (plain, packed):
        d = client.get(f"/api/quests/{qid}").get_json()
        assert d["report"]["problem"] is None
        assert d["report"]["report"]["accepted"] is True and d["report"]["report"]["records_valid"] == 8
        lines = d["preview"]["lines"]
        assert [ln["number"] for ln in lines] == [1, 2, 3, 4, 5]
        assert lines[0]["text"] == TEXT_LINES[0] and not lines[0]["truncated"]
        assert d["file"].startswith("queue/normal/")
    bad = add_quest(qrealm, daemon_ledger, "bad.jsonl", ["{oops"] * 4)
    rep = client.get(f"/api/quests/{bad}").get_json()["report"]["report"]
    assert rep["accepted"] is False and [x["line"] for x in rep["bad_lines"]] == [1, 2, 3, 4]


def test_preview_cuts_long_lines_and_bounds_reads(tmp_path, monkeypatch):
    long_line = "x" * (PREVIEW_LINE_CHARS * 10)
    p = tmp_path / "long.jsonl"
    p.write_text(long_line + "\nsecond\n")
    lines = read_preview(p)["lines"]
    assert lines[0]["truncated"] and len(lines[0]["text"]) == PREVIEW_LINE_CHARS
    assert lines[1] == {"number": 2, "text": "second", "truncated": False}
    bomb = tmp_path / "bomb.jsonl.gz"  # 64 MiB of one line, a few KiB compressed
    with gzip.open(bomb, "wb") as f:
        f.write(b"y" * (64 << 20))
    read_bytes = []
    real_open = quest_files._open_binary

    def counting_open(path):
        f = real_open(path)
        readline = f.readline
        f.readline = lambda size=-1: read_bytes.append(len(line := readline(size))) or line
        return f

    monkeypatch.setattr(quest_files, "_open_binary", counting_open)
    pv = read_preview(bomb)
    assert len(pv["lines"]) == 1 and pv["lines"][0]["truncated"]
    assert 0 < sum(read_bytes) <= PREVIEW_BUDGET_BYTES  # not the 64 MiB behind it
    assert read_preview(tmp_path / "missing.jsonl")["problem"] == "the file is no longer there"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n')
    assert read_preview(bom)["lines"][0]["text"] == '{"text": "a"}'


def test_preview_of_a_rejected_fifo_or_folder_never_opens_it(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    (tmp_path / "folder.jsonl").mkdir()
    for path in (fifo, tmp_path / "folder.jsonl"):
        assert "not a regular file" in read_preview(path)["problem"]


# actions ----------------------------------------------------------------------------------------------
def test_change_priority_moves_the_file(client, qrealm, daemon_ledger):
    qid = add_quest(qrealm, daemon_ledger, "data.jsonl", TEXT_LINES, "normal")
    r = post(client, f"/api/quests/{qid}/priority", json={"priority": "high"})
    assert r.status_code == 200 and r.get_json()["quest"]["priority"] == "high"
    stored = daemon_ledger.get_quest(qid)["stored_name"]
    assert (qrealm.queue_dir("high") / stored).is_file()
    assert (qrealm.queue_dir("high") / (stored + ".report.json")).is_file()
    assert not (qrealm.queue_dir("normal") / stored).exists()
    assert post(client, f"/api/quests/{qid}/priority", json={"priority": "urgent"}).status_code == 400
    QuestQueue(qrealm, daemon_ledger).transition(qid, QuestState.PROCESSING)  # the daemon took it meanwhile
    r = post(client, f"/api/quests/{qid}/priority", json={"priority": "low"})
    assert r.status_code == 409 and "processing" in r.get_json()["error"]
    assert post(client, "/api/quests/999/priority", json={"priority": "low"}).status_code == 404


def test_retry_only_training_failures(client, qrealm, daemon_ledger):
    crashed = add_quest(qrealm, daemon_ledger, "crashy.jsonl", TEXT_LINES)
    fail_in_training(qrealm, daemon_ledger, crashed)
    r = post(client, f"/api/quests/{crashed}/retry")
    assert r.status_code == 200
    row = daemon_ledger.get_quest(crashed)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["error"] is None
    assert (qrealm.queue_dir("normal") / row["stored_name"]).is_file()
    invalid = add_quest(qrealm, daemon_ledger, "invalid.jsonl", ["nope"] * 3)
    r = post(client, f"/api/quests/{invalid}/retry")
    assert r.status_code == 409 and "fix the file and drop it" in r.get_json()["error"]
    assert daemon_ledger.get_quest(invalid)["state"] == "failed"
    assert post(client, f"/api/quests/{crashed}/retry").status_code == 409  # queued now, not failed


def test_remove_moves_to_trash_and_restore_brings_it_back(client, qrealm, daemon_ledger):
    qid = add_quest(qrealm, daemon_ledger, "data.jsonl", TEXT_LINES, "low")
    stored = daemon_ledger.get_quest(qid)["stored_name"]
    r = post(client, f"/api/quests/{qid}/remove")
    assert r.status_code == 200 and r.get_json()["quest"]["actions"] == ["restore"]
    assert (qrealm.queue_dir("trash") / stored).read_text().startswith('{"text"')  # kept, not destroyed
    assert not (qrealm.queue_dir("low") / stored).exists()
    assert post(client, f"/api/quests/{qid}/remove").status_code == 409
    assert post(client, f"/api/quests/{qid}/restore").status_code == 200
    assert (qrealm.queue_dir("low") / stored).is_file()
    invalid = add_quest(qrealm, daemon_ledger, "invalid.jsonl", ["nope"] * 3)
    assert post(client, f"/api/quests/{invalid}/remove").status_code == 200
    assert post(client, f"/api/quests/{invalid}/restore").status_code == 409  # never queue invalid data
    QuestQueue(qrealm, daemon_ledger).transition(qid, QuestState.PROCESSING)
    assert post(client, f"/api/quests/{qid}/remove").status_code == 409  # not while training it
    kinds = [e["kind"] for e in daemon_ledger.events()]
    assert "quest_removed" in kinds and "quest_restored" in kinds


def test_state_changes_are_post_only_and_same_origin(client, qrealm, daemon_ledger):
    qid = add_quest(qrealm, daemon_ledger, "data.jsonl", TEXT_LINES)
    for action in ("retry", "remove", "restore", "priority"):
        assert client.get(f"/api/quests/{qid}/{action}").status_code == 405
    r = client.post(f"/api/quests/{qid}/remove", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and daemon_ledger.get_quest(qid)["state"] == "queued"


def test_path_traversal_is_refused(client, qrealm, daemon_ledger):
    (qrealm.root / "secret.txt").write_text("secret")
    for url in ["/api/quests/..%2F..%2Fconfig.json", "/api/quests/../config.json", "/api/quests/-1",
                "/api/quests/1%2F..%2F..", "/api/quests/%2e%2e"]:
        r = client.get(url)
        assert r.status_code in (400, 404), url
        assert b"secret" not in r.data
    # a ledger row pointing outside the realm (e.g. a tampered ledger) is refused, never read
    qid = add_quest(qrealm, daemon_ledger, "data.jsonl", TEXT_LINES)
    outside = qrealm.root.parent / "outside.jsonl"
    outside.write_text('{"text": "forbidden-fruit-42"}\n')
    for stored in ("../../secret.txt", "../../../outside.jsonl"):
        daemon_ledger.execute("UPDATE quests SET stored_name=? WHERE id=?", (stored, qid))
        r = client.get(f"/api/quests/{qid}")
        assert r.status_code == 403, stored
        assert b"forbidden-fruit-42" not in r.data and b'"secret"' not in r.data


# uploads ----------------------------------------------------------------------------------------------
def upload(client, name, data, priority="normal"):
    return post(client, "/api/quests/upload", content_type="multipart/form-data",
                data={"file": (io.BytesIO(data), name), "priority": priority})


def inbox_files(realm):
    return sorted(str(p.relative_to(realm.inbox)) for p in realm.inbox.rglob("*") if p.is_file())


def test_upload_lands_in_the_inbox_and_never_overwrites(client, qrealm):
    body = ("\n".join(TEXT_LINES) + "\n").encode()
    r = upload(client, "data.jsonl", body, "high")
    assert r.status_code == 201 and r.get_json() == {"name": "data.jsonl", "priority": "high",
                                                      "path": "inbox/high/data.jsonl"}
    assert upload(client, "data.jsonl", b'{"text": "second"}\n', "high").get_json()["name"] == "data-2.jsonl"
    assert upload(client, "data.jsonl.gz", gzip.compress(body), "high").status_code == 201
    assert upload(client, XSS_NAME, body).status_code == 201  # odd names are data: kept, escaped when shown
    assert inbox_files(qrealm) == ["high/data-2.jsonl", "high/data.jsonl", "high/data.jsonl.gz",
                                   f"normal/{XSS_NAME}"]
    assert (qrealm.inbox / "high" / "data.jsonl").read_bytes() == body
    (qrealm.inbox / "high_dropped.jsonl").write_text("{}\n")  # dropped by hand: priority from the prefix
    (qrealm.inbox / "low" / ".upload-123.part").write_text("{}\n")  # an upload in progress: not listed
    listed = {f["name"]: f["priority"] for f in client.get("/api/quests").get_json()["inbox"]}
    assert listed == {"data.jsonl": "high", "data-2.jsonl": "high", "data.jsonl.gz": "high",
                      XSS_NAME: "normal", "high_dropped.jsonl": "high"}


@pytest.mark.parametrize("name", ["../evil.jsonl", "a/b.jsonl", "..\\evil.jsonl", ".hidden.jsonl", "data.exe",
                                  "data.parquet.gz", "data.jsonl.part", ".jsonl", ".csv", "x\n.jsonl", ""])
def test_upload_refuses_bad_names(client, qrealm, name):
    r = upload(client, name, b'{"text": "a"}\n')
    assert r.status_code == 400, name
    assert inbox_files(qrealm) == [] and not list(qrealm.root.glob("evil*"))


@pytest.mark.parametrize("name", ["data.json", "data.csv", "data.tsv.gz", "data.parquet", "notes.txt"])
def test_upload_takes_every_quest_container(client, qrealm, name):
    assert upload(client, name, b'[{"text": "a"}]').status_code in (200, 201), name
    assert inbox_files(qrealm) == [f"normal/{name}"]


def test_preview_reads_other_containers_through_core_containers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text('[{"text": "first"}, {"text": "second"}]')
    (tmp_path / "a.csv").write_text('text,n\nfirst,1\n"two\nlines",2\nragged\n')
    pq.write_table(pa.Table.from_pylist([{"text": "first"}, {"text": "second"}]), tmp_path / "a.parquet")
    pv = read_preview(tmp_path / "a.json")
    assert pv["container"] == "json" and [(x["number"], json.loads(x["text"])) for x in pv["lines"]] == [
        (1, {"text": "first"}), (2, {"text": "second"})]
    pv = read_preview(tmp_path / "a.csv")
    assert [x["number"] for x in pv["lines"]] == [1, 2, 3] and json.loads(pv["lines"][1]["text"])["text"] == "two\nlines"
    assert "the header has 2" in pv["lines"][2]["text"]
    pv = read_preview(tmp_path / "a.parquet")
    assert pv["container"] == "parquet" and json.loads(pv["lines"][1]["text"]) == {"text": "second"}
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    assert "not a Parquet file" in read_preview(tmp_path / "bad.parquet")["problem"]


def test_upload_refuses_bad_priority_and_missing_file(client, qrealm):
    assert upload(client, "a.jsonl", b"{}\n", priority="../../x").status_code == 400
    assert post(client, "/api/quests/upload", data={"priority": "normal"}).status_code == 400
    assert inbox_files(qrealm) == []


def test_upload_over_the_limit_is_refused_with_413(client, qrealm):
    r = upload(client, "big.jsonl", b"x" * (UPLOAD_LIMIT * 3))
    assert r.status_code == 413 and "limit" in r.get_json()["error"]
    assert inbox_files(qrealm) == []


def test_save_upload_limit_counts_file_bytes_and_leaves_nothing(tmp_path):
    inbox = tmp_path / "inbox"
    with pytest.raises(UploadError) as exc:
        save_upload(io.BytesIO(b"x" * 101), "a.jsonl", "normal", inbox, max_bytes=100)
    assert exc.value.status == 413 and list(inbox.rglob("*")) == [inbox / "normal"]
    assert save_upload(io.BytesIO(b"x" * 100), "a.jsonl", "normal", inbox, max_bytes=100).stat().st_size == 100
    assert check_upload_name(XSS_NAME) == XSS_NAME


# a real browser ----------------------------------------------------------------------------------------
def test_browser_shows_hostile_names_as_text_and_takes_the_screenshot(live_tavern, page):
    realm, ledger = live_tavern.realm, live_tavern.ledger
    add_quest(realm, ledger, XSS_NAME, TEXT_LINES, "high")
    add_quest(realm, ledger, "tinyshakespeare-part1.jsonl", TEXT_LINES, "normal")
    add_quest(realm, ledger, "hh_rlhf_harmless.jsonl.gz", PREF_LINES, "low", gz=True)
    add_quest(realm, ledger, "broken.jsonl", ['{"text": 1}', "{oops"], "normal")
    hostile_record = json.dumps({"text": "<script>alert(2)</script><img src=y onerror=alert(3)>"})
    add_quest(realm, ledger, "records.jsonl", [hostile_record] * 3, "normal")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(live_tavern.url + "/quests")
    name_cell = page.locator("#group-queued tr", has_text="onerror").locator("button.qname")
    name_cell.wait_for()
    assert name_cell.inner_text() == XSS_NAME
    assert page.locator("#group-queued img").count() == 0
    page.locator("#group-queued button.qname", has_text="records.jsonl").click()
    page.locator("#preview-lines").wait_for()
    assert "<script>alert(2)</script>" in page.locator("#preview-lines").inner_text()
    assert page.locator("#quest-detail img, #quest-detail script").count() == 0
    assert page.locator("#group-waiting").inner_text().count("waiting for DPO") == 0  # every format has a school
    hh = page.locator("#group-queued tr", has_text="hh_rlhf_harmless")
    assert hh.locator("td.school").inner_text() == "dpo" and hh.locator("td.school").get_attribute("title") == "Judge"
    page.locator("#group-queued button.qname", has_text="onerror").click()
    page.locator("#detail-name", has_text="onerror").wait_for()
    # positive sentinel, not a pause: the hostile quest's own preview is on screen, so its detail is rendered
    page.locator("#preview-lines", has_text="Once upon a time 0").wait_for()
    assert page.locator("#quest-detail img, #quest-detail script").count() == 0  # the name stayed text
    assert dialogs == [] and page.console_errors == []
    save_screenshot(page, "quests")


def test_browser_follows_quest_states_live_without_reload(live_tavern, page):
    realm, ledger = live_tavern.realm, live_tavern.ledger
    (realm.inbox / "normal" / XSS_NAME).write_text(TEXT_LINES[0] + "\n")  # waiting in the inbox
    qid = add_quest(realm, ledger, "live.jsonl", TEXT_LINES)
    page.goto(live_tavern.url + "/quests")
    row = f'tr[data-quest-id="{qid}"]'
    page.locator(f"#group-queued {row}").wait_for()
    assert page.locator("#inbox-list").inner_text().strip().startswith(XSS_NAME)
    assert page.locator("#inbox-list img").count() == 0
    page.evaluate("window.__sameDocument = true")
    queue = QuestQueue(realm, ledger)
    queue.transition(qid, QuestState.PROCESSING)  # what the daemon does, in its own connection
    page.locator(f"#group-processing {row}").wait_for()
    ledger.record_step(global_step=1, quest_id=qid, loss=2.0, learning_rate=1e-3, grad_norm=1.0, tokens=64,
                       tokens_per_second=100.0, example_start=0, example_end=8, example_lines=[], quest_steps=1)
    queue.transition(qid, QuestState.COMPLETED)
    page.locator(f"#group-finished {row}").wait_for()
    assert "8 / 8" in page.locator(f"#group-finished {row}").inner_text()
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert page.console_errors == []


def test_browser_upload_appears_in_the_inbox_list(live_tavern, page, tmp_path):
    f = tmp_path / "fresh_quest.jsonl"
    f.write_text("\n".join(TEXT_LINES) + "\n")
    page.goto(live_tavern.url + "/quests")
    page.set_input_files("#upload-file", str(f))
    page.select_option("#upload-priority", "low")
    page.click("#upload-button")
    page.locator("#inbox-list li", has_text="fresh_quest.jsonl").wait_for()
    assert (live_tavern.realm.inbox / "low" / "fresh_quest.jsonl").read_text() == f.read_text()
