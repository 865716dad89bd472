"""The ledger: rows, rollback, the control channel, and the typed methods used outside ``core``."""

import os
import sqlite3
import time

import pytest

from core.contract import NOT_RUNNING
from core.ledger import MIGRATIONS, CommandState, Ledger, QuestState, StepRow
from core.quest_queue import QuestQueue
from core.realm import init_realm


def _step(ledger, step, quest_id, start, end):
    ledger.record_step(global_step=step, quest_id=quest_id, loss=1.0, learning_rate=1e-3, grad_norm=1.0,
                       tokens=10, tokens_per_second=100.0, example_start=start, example_end=end,
                       example_lines=list(range(start + 1, end + 1)), quest_steps=step)


def test_rollback_restores_quest_progress(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    with ledger.transaction() as c:
        c.execute("INSERT INTO quests(name, stored_name, state, priority, created_at, updated_at) "
                  "VALUES ('a','a','processing','normal',0,0)")
    for s in range(1, 6):
        _step(ledger, s, 1, (s - 1) * 4, s * 4)
    assert ledger.get_quest(1)["examples_trained"] == 20
    assert ledger.rollback_to(3) == 2
    q = ledger.get_quest(1)
    assert (q["examples_trained"], q["steps"], q["last_global_step"]) == (12, 3, 3)
    assert ledger.last_step()["global_step"] == 3


def test_control_channel_roundtrip_between_connections(tmp_path):
    sender, daemon = Ledger(tmp_path / "l.sqlite"), Ledger(tmp_path / "l.sqlite")
    cid = sender.send_command("pause")
    pending = daemon.pending_commands()
    assert [c["command"] for c in pending] == ["pause"]
    daemon.finish_command(cid, CommandState.DONE, "paused")
    assert sender.pending_commands() == []
    assert sender.query("SELECT result FROM commands WHERE id=?", (cid,))[0]["result"] == "paused"


def test_kv_and_events(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_value("daemon", {"state": "idle"})
    assert ledger.get_value("daemon") == {"state": "idle"}
    ledger.event("x", "hello <b>", level="warning", a=1)
    ev = ledger.events()[-1]
    assert ev["message"] == "hello <b>" and ev["level"] == "warning"


# typed methods: what the Tavern, the CLI, safety/ and management/ read instead of SQL -------------------


@pytest.fixture
def realm_ledger(tmp_path):
    realm = init_realm(tmp_path / "realm")
    ledger = Ledger(realm.ledger_path)
    yield realm, ledger
    ledger.close()


def _quest(realm, ledger, name, state=QuestState.QUEUED, priority="normal"):
    path = realm.inbox / name
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    queue = QuestQueue(realm, ledger)
    qid = queue.admit(path, priority)
    queue.transition(qid, QuestState.QUEUED, format="text", examples_total=100)
    if state in (QuestState.PROCESSING, QuestState.COMPLETED):
        queue.transition(qid, QuestState.PROCESSING)
    if state == QuestState.COMPLETED:
        queue.transition(qid, QuestState.COMPLETED)
    return qid


def test_quest_queries(realm_ledger):
    realm, ledger = realm_ledger
    a = _quest(realm, ledger, "a.jsonl", priority="high")
    b = _quest(realm, ledger, "b.jsonl")
    c = _quest(realm, ledger, "c.jsonl")
    d = _quest(realm, ledger, "d.jsonl", QuestState.COMPLETED)
    e = _quest(realm, ledger, "e.jsonl", QuestState.COMPLETED)
    assert ledger.queued_counts_by_priority() == {"high": 1, "normal": 2}
    assert ledger.quest_states() == {a: ("queued", "high"), b: ("queued", "normal"), c: ("queued", "normal"),
                                     d: ("completed", "normal"), e: ("completed", "normal")}
    assert [q["id"] for q in ledger.recent_quests(QuestState.COMPLETED, 1)] == [e]
    assert [q["id"] for q in ledger.recent_quests(QuestState.COMPLETED, 10)] == [e, d]
    clock = ledger.last_quest_update()
    assert clock == max(q["updated_at"] for q in ledger.list_quests())
    assert ledger.quests_updated_since(clock) == []
    ledger.update_quest(b, note="touched")
    assert [q["id"] for q in ledger.quests_updated_since(clock)] == [b]


def test_step_and_eval_queries(realm_ledger):
    realm, ledger = realm_ledger
    q1 = _quest(realm, ledger, "one.jsonl", QuestState.PROCESSING)
    q2 = _quest(realm, ledger, "two.jsonl", QuestState.PROCESSING)
    assert ledger.step_bounds() == (None, None) and ledger.recent_steps(5) == []
    assert ledger.recent_steps(5, quest_id=q1) == []  # no steps yet: nothing scanned
    for s in range(1, 11):  # steps 1-4 and 9-10 of quest 1, 5-8 of quest 2
        qid = q2 if 5 <= s <= 8 else q1
        _step(ledger, s, qid, s * 2, s * 2 + 2)
    assert ledger.step_bounds() == (1, 10)
    assert [r["global_step"] for r in ledger.recent_steps(3)] == [10, 9, 8]
    assert [r["global_step"] for r in ledger.recent_steps(4, quest_id=q1)] == [10, 9, 4, 3]
    assert [r["global_step"] for r in ledger.recent_steps(9, quest_id=q2)] == [8, 7, 6, 5]
    assert "examples_json" not in ledger.recent_steps(1)[0]
    assert [r["global_step"] for r in ledger.steps(8, with_examples=False)] == [9, 10]
    assert "examples_json" not in ledger.steps(8, with_examples=False)[0] and "examples_json" in ledger.steps(8)[0]
    assert [q["name"] for q in ledger.quests_trained_until(6)] == ["one.jsonl", "two.jsonl"]
    assert ledger.quests_trained_until(6)[1] == {"id": q2, "name": "two.jsonl", "steps": 2, "examples_trained": 14}

    assert ledger.latest_eval() is None and ledger.last_eval_seq() == 0
    ledger.record_eval(4, q1, 2.0, 8)
    ledger.record_eval(8, q2, 1.5, 8)
    ledger.record_eval(8, q1, 1.7, 8)
    assert ledger.latest_eval()["eval_loss"] == 1.7  # the newest of the highest step
    assert [(e["global_step"], e["eval_loss"]) for e in ledger.evals_until(7, 10)] == [(4, 2.0)]
    assert len(ledger.evals_until(8, 2)) == 2
    seq = ledger.last_eval_seq()
    assert [e["eval_loss"] for e in ledger.evals_written_after(0)] == [2.0, 1.5, 1.7]
    assert ledger.evals_written_after(seq) == []
    ledger.record_eval(9, q1, 1.6, 8)
    new = ledger.evals_written_after(seq)
    assert [e["eval_loss"] for e in new] == [1.6] and new[0]["seq"] > seq


def test_history_bounds_and_raw_history(realm_ledger):
    _, ledger = realm_ledger
    assert ledger.history_bounds().first_step is None
    for s in range(3, 13):
        ledger.record_step(global_step=s, quest_id=None, loss=float(s), learning_rate=0.1, grad_norm=1.0,
                           tokens=1, tokens_per_second=1.0, example_start=0, example_end=0, example_lines=[],
                           quest_steps=0)
    ledger.record_eval(2, None, 9.0, 1)  # an eval before the first step widens the range
    b = ledger.history_bounds()
    assert (b.first_step, b.last_step, b.last_global_step) == (2, 12, 12)
    h = ledger.history(3, 12, max_points=5)
    assert h.bucket_steps == 2 and h.train["global_step"] == [3.5, 5.5, 7.5, 9.5, 11.5]
    assert h.train["loss"] == [3.5, 5.5, 7.5, 9.5, 11.5] and h.train["loss_max"] == [4.0, 6.0, 8.0, 10.0, 12.0]
    assert h.eval == {"global_step": [], "eval_loss": []}
    with pytest.raises(ValueError):
        ledger.history(5, 4, 10)


def test_event_queries(realm_ledger):
    _, ledger = realm_ledger
    assert ledger.last_event_id() == 0
    for i in range(5):
        ledger.event("crash" if i % 2 else "note", f"m{i}", n=i)
    ledger.event("crash", "no data")
    assert [e["message"] for e in ledger.latest_events(2)] == ["m4", "no data"]
    assert ledger.last_event_id() == ledger.latest_events(1)[0]["id"]
    crashes = ledger.events_of_kind("crash", 10)
    assert [(e["message"], e["data"]) for e in crashes] == [("no data", None), ("m3", {"n": 3}), ("m1", {"n": 1})]
    assert len(ledger.events_of_kind("crash", 1)) == 1


def test_command_queries(realm_ledger):
    _, ledger = realm_ledger
    assert ledger.command(1) is None and ledger.command_states() == {}
    ids = [ledger.send_command(c) for c in ("pause", "resume", "skip")]
    ledger.finish_command(ids[0], CommandState.DONE, "paused")
    assert ledger.command(ids[0])["result"] == "paused" and ledger.command(ids[1])["state"] == "pending"
    assert [c["command"] for c in ledger.recent_commands(2)] == ["skip", "resume"]
    assert ledger.command_states() == {ids[0]: "done", ids[1]: "pending", ids[2]: "pending"}
    assert [c["id"] for c in ledger.commands_since(ids[2])] == []
    assert [c["id"] for c in ledger.commands_since(ids[1], also=[ids[0]])] == [ids[0], ids[2]]
    assert [c["id"] for c in ledger.commands_since(0)] == ids


def test_daemon_and_supervisor_status_through_the_contract(realm_ledger):
    _, ledger = realm_ledger
    assert ledger.daemon_status().display_state == NOT_RUNNING and ledger.value_updated_at("daemon") is None
    assert ledger.supervisor_status() is None
    before = time.time()
    ledger.publish_daemon_status({"state": "training", "pid": os.getpid(), "global_step": 7})
    d = ledger.daemon_status()
    assert d.display_state == "training" and d.alive and d.get("global_step") == 7
    assert ledger.value_updated_at("daemon") >= before
    assert ledger.get_value("daemon")["global_step"] == 7  # the kv key of core.contract
    assert ledger.daemon_status(now=time.time() + 3600).display_state == "not responding"
    ledger.publish_supervisor_status({"pid": 1, "state": "running", "children": {}})
    assert ledger.supervisor_status()["state"] == "running" and ledger.get_value("supervisor")["pid"] == 1


def test_bulk_record_steps_fills_steps_and_rollups(realm_ledger):
    _, ledger = realm_ledger
    n = ledger.bulk_record_steps(StepRow(global_step=s, loss=1.0 / s, learning_rate=0.1, example_lines=[s])
                                 for s in range(1, 20_001))
    assert n == 20_000 and ledger.step_bounds() == (1, 20_000)
    assert ledger.steps(19_999)[0]["examples_json"] == "[20000]"
    h = ledger.history(1, 20_000, 100)  # read from the rollups
    assert h.bucket_steps == 256 and h.train["loss_max"][0] == 1.0


def test_an_old_ledger_is_migrated_on_open(tmp_path):
    path = tmp_path / "old.sqlite"
    Ledger(path).close()
    conn = sqlite3.connect(path)  # a ledger written before the rollups existed
    conn.execute("DROP TABLE rollups")
    conn.execute("PRAGMA user_version=0")
    conn.executemany("INSERT INTO steps(global_step, time, loss, learning_rate) VALUES (?,?,?,?)",
                     [(s, 0.0, float(s % 7), 0.1) for s in range(1, 40_001)])
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    assert ledger.query("PRAGMA user_version")[0]["user_version"] == len(MIGRATIONS)
    h = ledger.history(1, 40_000, 100)
    assert h.bucket_steps == 512 and h.train["loss_max"][1] == 6.0 and h.train["loss_min"][1] == 0.0
    assert sum(ledger.query("SELECT SUM(n) AS n FROM rollups WHERE level=3")[0].values()) == 40_000
    ledger.close()
