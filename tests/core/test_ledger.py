from core.ledger import CommandState, Ledger


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
