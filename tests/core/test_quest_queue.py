import os

import pytest

from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue, QuestStateError
from core.realm import init_realm


@pytest.fixture
def queue(tmp_path):
    realm = init_realm(tmp_path / "realm")
    ledger = Ledger(realm.ledger_path)
    yield QuestQueue(realm, ledger)
    ledger.close()


def _drop(queue, name, text="{}\n"):
    p = queue.realm.inbox / name
    p.write_text(text)
    return p


def test_admit_never_overwrites_same_name(queue):
    a = queue.admit(_drop(queue, "data.jsonl", "a\n"))
    b = queue.admit(_drop(queue, "data.jsonl", "b\n"))
    qa, qb = queue.ledger.get_quest(a), queue.ledger.get_quest(b)
    assert qa["stored_name"] != qb["stored_name"]
    assert queue.path_of(qa).read_text() == "a\n" and queue.path_of(qb).read_text() == "b\n"
    assert not (queue.realm.inbox / "data.jsonl").exists()


def test_transition_moves_file_and_report(queue):
    qid = queue.admit(_drop(queue, "x.jsonl"), "high")
    quest = queue.ledger.get_quest(qid)
    queue.report_path_of(quest).write_text("{}")
    q = queue.transition(qid, QuestState.QUEUED, format="text")
    assert queue.path_of(q).parent.name == "high" and queue.path_of(q).exists()
    assert queue.report_path_of(q).exists()
    q = queue.transition(qid, QuestState.PROCESSING)
    assert queue.path_of(q).parent.name == "processing" and q["started_at"]
    q = queue.transition(qid, QuestState.COMPLETED)
    assert queue.path_of(q).parent.name == "recently_completed"
    assert queue.ledger.get_quest(qid)["state"] == "completed"


def test_illegal_transition_refused_and_nothing_moves(queue):
    qid = queue.admit(_drop(queue, "x.jsonl"))
    with pytest.raises(QuestStateError):
        queue.transition(qid, QuestState.COMPLETED)
    quest = queue.ledger.get_quest(qid)
    assert quest["state"] == "validating" and queue.path_of(quest).exists()


def test_failed_rename_rolls_back_the_ledger(queue):
    qid = queue.admit(_drop(queue, "x.jsonl"))
    quest = queue.ledger.get_quest(qid)
    os.remove(queue.path_of(quest))  # the rename will fail
    with pytest.raises(FileNotFoundError):
        queue.transition(qid, QuestState.QUEUED)
    assert queue.ledger.get_quest(qid)["state"] == "validating"


def test_order_high_normal_low_then_oldest_and_deferred_last(queue):
    ids = {}
    for name, prio in [("l.jsonl", "low"), ("n1.jsonl", "normal"), ("h.jsonl", "high"), ("n2.jsonl", "normal")]:
        ids[name] = queue.admit(_drop(queue, name), prio)
        queue.transition(ids[name], QuestState.QUEUED, format="text")
    order = []
    for _ in range(4):
        q = queue.next_trainable({"text"})
        order.append(q["name"])
        queue.transition(q["id"], QuestState.PROCESSING)
        queue.transition(q["id"], QuestState.COMPLETED)
    assert order == ["h.jsonl", "n1.jsonl", "n2.jsonl", "l.jsonl"]
    a = queue.admit(_drop(queue, "a.jsonl"), "high")
    queue.transition(a, QuestState.QUEUED, format="text", deferred=1)
    b = queue.admit(_drop(queue, "b.jsonl"), "low")
    queue.transition(b, QuestState.QUEUED, format="text")
    assert queue.next_trainable({"text"})["id"] == b


def test_untrainable_formats_wait(queue):
    qid = queue.admit(_drop(queue, "p.jsonl"))
    queue.transition(qid, QuestState.QUEUED, format="preference_implicit")
    assert queue.next_trainable({"text"}) is None
    assert [q["id"] for q in queue.waiting({"text"})] == [qid]


def test_reconcile_trusts_the_folder(queue):
    qid = queue.admit(_drop(queue, "x.jsonl"))
    quest = queue.ledger.get_quest(qid)
    # simulate a crash after the rename, before the commit
    os.rename(queue.path_of(quest), queue.realm.queue_dir("normal") / quest["stored_name"])
    notes = queue.reconcile()
    assert notes and queue.ledger.get_quest(qid)["state"] == "queued"


def test_a_name_too_long_for_the_queue_is_shortened_keeping_its_extension(queue):
    name = "\u00e9" * 120 + ".jsonl.gz"  # 249 bytes: with the id and .report.json over the 255-byte limit
    qid = queue.admit(_drop(queue, name, "x\n"))
    quest = queue.ledger.get_quest(qid)
    assert quest["name"] == name  # the user's name is kept in the ledger
    stored = quest["stored_name"]
    assert len(stored.encode()) <= 200 and stored.startswith(f"{qid:06d}-\u00e9") and stored.endswith("~.jsonl.gz")
    assert queue.path_of(quest).read_text() == "x\n"
    queue.transition(qid, QuestState.FAILED, error="test")  # the report beside it fits too
    queue.report_path_of(queue.ledger.get_quest(qid)).write_text("{}")


def test_a_dangling_symlink_is_taken_to_be_rejected(queue, tmp_path):
    link = queue.realm.inbox / "dangling.jsonl"
    os.symlink(tmp_path / "missing", link)
    quest = queue.ledger.get_quest(queue.admit(link))
    assert queue.path_of(quest).is_symlink() and not os.path.lexists(link)
