"""core.admission in a running daemon: hostile inbox entries cost that entry only, and what trains is
exactly what was validated (issue 8 item 8, ingest bugs). Real files, real daemon threads."""

from __future__ import annotations

import hashlib
import json
import os
import time

import core.admission
from core.admission import Admission
from core.realm import init_realm
from tests.conftest import write_text_quest
from tests.core.test_daemon import DaemonThread


def lines_json(n: int, start: int = 0, tag: str = "line") -> str:
    return "".join(json.dumps({"text": f"{tag} {i}: the quick brown fox"}) + "\n" for i in range(start, start + n))


def trained_lines(ledger, quest_id: int) -> list[int]:
    return sorted(ln for s in ledger.steps() if s["quest_id"] == quest_id for ln in json.loads(s["examples_json"]))


def idle(d) -> bool:
    return (d.ledger.get_value("daemon") or {}).get("state") == "idle"


def test_a_file_name_that_is_not_utf8_is_taken_under_its_escaped_name(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        d.wait_for(lambda: idle(d), what="idle")
        raw = os.fsencode(realm.inbox) + b"/bad\xff\xfename.jsonl"
        with open(raw, "w") as f:
            f.write(lines_json(6))
        d.wait_for(lambda: d.states() == ["completed"], what="the oddly named file trained")
        quest = d.quests()[0]
        assert quest["name"] == "bad\\xff\\xfename.jsonl" and quest["examples_trained"] == 6
        assert (realm.queue_dir("recently_completed") / quest["stored_name"]).is_file()
        assert sorted(os.listdir(os.fsencode(realm.inbox))) == [b"high", b"low", b"normal"]
        write_text_quest(realm.inbox / "next.jsonl", 4)  # the daemon lives on
        d.wait_for(lambda: d.states() == ["completed", "completed"], what="the next file trained")


def test_any_exception_validating_one_file_rejects_that_file_only(make_realm, monkeypatch):
    real = core.admission.validate_file

    def exploding(path, **kwargs):
        if kwargs.get("display_name") == "boom.jsonl":
            raise RuntimeError("the tokenizer library crashed")
        return real(path, **kwargs)

    monkeypatch.setattr(core.admission, "validate_file", exploding)
    realm = make_realm()
    with DaemonThread(realm) as d:
        write_text_quest(realm.inbox / "boom.jsonl", 4)
        d.wait_for(lambda: d.states() == ["failed"], what="boom rejected")
        quest = d.quests()[0]
        assert "RuntimeError: the tokenizer library crashed" in quest["error"]
        report = json.loads((realm.queue_dir("failed") / (quest["stored_name"] + ".report.json")).read_text())
        assert "the tokenizer library crashed" in report["reason"]
        write_text_quest(realm.inbox / "fine.jsonl", 4)
        d.wait_for(lambda: d.states() == ["failed", "completed"], what="the next file trained")


def test_a_writer_that_pauses_with_the_file_open_is_waited_for(make_realm):
    realm = make_realm()  # settle_seconds 0.3: the pause is 13 times longer
    with DaemonThread(realm) as d:
        d.wait_for(lambda: idle(d), what="idle")
        path = realm.inbox / "paused.jsonl"
        with open(path, "w") as f:
            f.write(lines_json(30))
            f.flush()
            time.sleep(4)
            f.write(lines_json(30, start=30))
        d.wait_for(lambda: d.states() == ["completed"], what="the whole file trained")
        quest = d.quests()[0]
        stored = realm.queue_dir("recently_completed") / quest["stored_name"]
        assert quest["records"] == 60 and quest["examples_trained"] == 60
        assert quest["content_hash"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert trained_lines(d.ledger, quest["id"]) == list(range(1, 61))


def test_a_file_changed_after_validation_is_validated_again_before_it_trains(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        d.ledger.send_command("pause")
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "paused", what="paused")
        write_text_quest(realm.inbox / "grows.jsonl", 30)
        d.wait_for(lambda: d.states() == ["queued"], what="queued")
        quest = d.quests()[0]
        with open(realm.queue_dir("normal") / quest["stored_name"], "a") as f:  # e.g. a writer unseen
            f.write(lines_json(30, start=30, tag="late"))
        d.ledger.send_command("resume")
        d.wait_for(lambda: d.states() == ["completed"], what="trained after validating again")
        quest = d.quests()[0]
        stored = realm.queue_dir("recently_completed") / quest["stored_name"]
        assert quest["records"] == 60 and quest["examples_trained"] == 60
        assert quest["content_hash"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert trained_lines(d.ledger, quest["id"]) == list(range(1, 61))
        report = json.loads(stored.with_name(stored.name + ".report.json").read_text())
        assert report["lines"] == 60
        assert [e["kind"] for e in d.ledger.events(limit=1000)].count("quest_changed") == 1


def test_a_file_changed_after_some_of_it_trained_is_not_trained_in_part(make_realm):
    realm = make_realm(training={"micro_batch_size": 1})
    with DaemonThread(realm) as d:
        write_text_quest(realm.inbox / "a.jsonl", 40)
        d.wait_for(lambda: (d.ledger.last_step() or {}).get("global_step", 0) >= 2, what="training")
        d.ledger.send_command("pause")
        d.wait_for(lambda: (d.ledger.get_value("daemon") or {}).get("state") == "paused", what="paused")
        quest = d.quests()[0]
        with open(realm.queue_dir("processing") / quest["stored_name"], "a") as f:
            f.write(lines_json(5, tag="late"))
        d.ledger.send_command("skip")  # back to the queue: the next start of it checks the file again
        d.ledger.send_command("resume")
        d.wait_for(lambda: d.states() == ["failed"], what="failed")
        quest = d.quests()[0]
        assert "changed after it was validated" in quest["error"] and "trained" in quest["error"]
        trained = trained_lines(d.ledger, quest["id"])
        assert trained == list(range(1, len(trained) + 1)) and 2 <= len(trained) <= 40  # validated lines only


def test_fifo_directory_and_subfolder_in_the_inbox_are_rejected_with_a_report(make_realm):
    realm = make_realm()
    with DaemonThread(realm) as d:
        d.wait_for(lambda: idle(d), what="idle")
        os.mkfifo(realm.inbox / "pipe.jsonl")  # opening it would block until a writer comes
        (realm.inbox / "folder.jsonl").mkdir()
        (realm.inbox / "folder.jsonl" / "inner.jsonl").write_text(lines_json(2))
        (realm.inbox / "sub").mkdir()
        (realm.inbox / "high" / "nested.jsonl").mkdir()
        d.wait_for(lambda: d.states().count("failed") == 4, what="four rejects")
        quests = {q["name"]: q for q in d.quests()}
        assert set(quests) == {"pipe.jsonl", "folder.jsonl", "sub", "nested.jsonl"}
        assert "a FIFO, not a regular file" in quests["pipe.jsonl"]["error"]
        assert all("a directory, not a file" in quests[n]["error"] for n in ("folder.jsonl", "sub", "nested.jsonl"))
        for q in quests.values():
            report = json.loads((realm.queue_dir("failed") / (q["stored_name"] + ".report.json")).read_text())
            assert report["reason"] == q["error"] and not report["accepted"]
        assert (realm.queue_dir("failed") / quests["folder.jsonl"]["stored_name"] / "inner.jsonl").is_file()
        assert sorted(os.listdir(realm.inbox)) == ["high", "low", "normal"]
        write_text_quest(realm.inbox / "good.jsonl", 4)
        d.wait_for(lambda: d.states()[-1] == "completed", what="a good file trained after them")


def test_a_file_that_could_not_be_moved_is_retried_without_changing(make_realm):
    realm = make_realm()
    obstacle = realm.queue_dir("validating") / "000001-stuck.jsonl"  # where quest 1 would be moved to
    obstacle.parent.mkdir(parents=True, exist_ok=True)
    obstacle.write_text("in the way\n")
    with DaemonThread(realm) as d:
        write_text_quest(realm.inbox / "stuck.jsonl", 4)
        d.wait_for(lambda: any(e["kind"] == "ingest_error" for e in d.ledger.events()), what="an ingest error")
        assert d.quests() == [] and (realm.inbox / "stuck.jsonl").exists()
        obstacle.unlink()  # the cause goes away; the file itself does not change
        d.wait_for(lambda: d.states() == ["completed"], timeout=30, what="taken on a retry")
        assert [e["kind"] for e in d.ledger.events()].count("ingest_error") == 1  # one alert, not one per retry
        assert any(e["kind"] == "ingest_recovered" for e in d.ledger.events())


def test_retry_backoff_doubles_and_a_changed_file_is_tried_at_once(tmp_path):
    from core.ledger import Ledger
    from core.quest_queue import QuestQueue

    class Clock:
        now = 100.0

        def __call__(self):
            return self.now

    realm = init_realm(tmp_path / "realm")
    ledger = Ledger(realm.ledger_path)
    clock = Clock()
    admission = Admission(realm, realm.load_config(), ledger, QuestQueue(realm, ledger), tokenizer=None, clock=clock)
    attempts = []

    def refuse(path, priority):
        attempts.append(clock.now)
        raise PermissionError(13, "Permission denied")

    admission.queue.admit = refuse
    path = write_text_quest(realm.inbox / "a.jsonl", 2)
    for _ in range(40):
        admission.take(path, "normal")
        clock.now += 0.5
    assert [t - 100.0 for t in attempts] == [0.0, 1.0, 3.0, 7.0, 15.0]  # 1 s, then doubling
    write_text_quest(path, 3)  # changed: tried at once
    admission.take(path, "normal")
    assert len(attempts) == 6 and attempts[-1] == clock.now
    ledger.close()
