"""The read API (/api/history, /api/events, /api/schema), controls and system pages."""

from __future__ import annotations

import os

import pytest

from core.ledger import Ledger

SAME_ORIGIN = {"Origin": "http://localhost"}


@pytest.fixture
def daemon_ledger(tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    yield ledger
    ledger.close()


def fill_steps(ledger, n, loss=lambda s: 10.0 / s):
    with ledger.transaction() as c:  # fast bulk insert, same columns as record_step
        c.executemany("INSERT INTO steps(global_step, quest_id, time, loss, learning_rate, grad_norm, tokens, "
                      "tokens_per_second) VALUES (?,?,?,?,?,?,?,?)",
                      [(s, None, float(s), loss(s), 1e-3, 0.5, 10, 100.0) for s in range(1, n + 1)])


def test_history_is_whole_and_exact_when_short(client, daemon_ledger):
    fill_steps(daemon_ledger, 50)
    daemon_ledger.record_eval(25, None, 1.5, 4)
    h = client.get("/api/history").get_json()
    assert h["bucket_steps"] == 1 and h["last_global_step"] == 50
    assert h["train"]["global_step"] == list(range(1, 51))
    assert h["train"]["loss"] == pytest.approx([10.0 / s for s in range(1, 51)])
    assert h["eval"] == {"global_step": [25], "eval_loss": [1.5]}


def test_history_is_downsampled_server_side(client, daemon_ledger):
    fill_steps(daemon_ledger, 10_000)
    h = client.get("/api/history?max_points=100").get_json()
    assert h["bucket_steps"] == 100
    assert len(h["train"]["global_step"]) == 100
    # first bucket: steps 1..100, mean loss and its min/max
    assert h["train"]["global_step"][0] == pytest.approx(50.5)
    assert h["train"]["loss"][0] == pytest.approx(sum(10.0 / s for s in range(1, 101)) / 100)
    assert h["train"]["loss_max"][0] == 10.0 and h["train"]["loss_min"][0] == pytest.approx(0.1)
    # a zoomed range gets finer buckets
    z = client.get("/api/history?max_points=100&from_step=1000&to_step=1099").get_json()
    assert z["bucket_steps"] == 1 and z["train"]["global_step"][0] == 1000 and len(z["train"]["loss"]) == 100


@pytest.mark.parametrize("query", ["max_points=abc", "max_points=1", "max_points=999999", "from_step=-1",
                                   "from_step=10&to_step=5"])
def test_history_rejects_bad_parameters(client, query):
    r = client.get(f"/api/history?{query}")
    assert r.status_code == 400 and r.get_json()["error"]


def test_history_of_an_empty_ledger(client):
    h = client.get("/api/history").get_json()
    assert h["train"]["global_step"] == [] and h["last_global_step"] is None


def test_events_newest_and_since(client, daemon_ledger):
    for i in range(1, 8):
        daemon_ledger.event("test", f"message {i}", n=i)
    r = client.get("/api/events?limit=3").get_json()["events"]
    assert [e["message"] for e in r] == ["message 5", "message 6", "message 7"]
    assert r[0]["data"] == {"n": 5}
    r = client.get(f"/api/events?since_id={r[0]['id']}").get_json()["events"]
    assert [e["message"] for e in r] == ["message 6", "message 7"]


def test_schema_has_config_and_quest_schemas(client):
    s = client.get("/api/schema").get_json()
    assert "tavern" in s["config"]["properties"] and "$defs" in s["config"]
    titles = [x["title"] for x in s["quest_record"]["oneOf"]]
    assert titles == ["text", "messages", "prompt_completion", "preference", "preference_implicit",
                      "preference_sharegpt", "unpaired_preference", "messages_rated", "alpaca", "sharegpt"]
    assert "queued" in s["quest"]["properties"]["state"]["enum"]


def test_glossary(client):
    g = client.get("/api/glossary").get_json()
    assert g["glossary"]["vault"].startswith("the checkpoints folder")
    assert "| ATK |" in g["formulas_markdown"]


# controls -------------------------------------------------------------------------------------------------
def test_controls_refuse_when_the_daemon_is_not_running(client):
    r = client.post("/api/controls/pause", headers=SAME_ORIGIN)
    assert r.status_code == 409 and "not running" in r.get_json()["error"]


def test_controls_queue_commands_for_the_daemon(client, daemon_ledger):
    daemon_ledger.set_value("daemon", {"state": "training", "pid": os.getpid()})
    for command in ("pause", "resume", "skip", "stop"):
        r = client.post(f"/api/controls/{command}", headers=SAME_ORIGIN)
        assert r.status_code == 202
        body = r.get_json()
        assert body["command"] == command and body["state"] == "pending"
    assert [c["command"] for c in daemon_ledger.pending_commands()] == ["pause", "resume", "skip", "stop"]
    first = daemon_ledger.pending_commands()[0]
    from core.ledger import CommandState

    daemon_ledger.finish_command(first["id"], CommandState.DONE, "paused")
    got = client.get(f"/api/controls/{first['id']}").get_json()
    assert got["state"] == "done" and got["result"] == "paused"
    assert len(client.get("/api/controls").get_json()["commands"]) == 4
    assert client.get("/api/controls/999").status_code == 404


def test_unknown_command_is_refused(client, daemon_ledger):
    daemon_ledger.set_value("daemon", {"state": "training", "pid": os.getpid()})
    r = client.post("/api/controls/rm-rf", headers=SAME_ORIGIN)
    assert r.status_code == 404
    assert daemon_ledger.pending_commands() == []


# system -----------------------------------------------------------------------------------------------------
def test_system_reports_cpu_ram_disk_and_gpu_plainly(client, tavern_realm):
    s = client.get("/api/system").get_json()
    assert s["cpu"]["count"] >= 1 and len(s["cpu"]["per_cpu_percent"]) == s["cpu"]["count"]
    assert s["memory"]["total_bytes"] > 0 and 0 <= s["memory"]["percent"] <= 100
    assert s["disk"]["path"] == str(tavern_realm.root) and s["disk"]["free_bytes"] > 0
    assert s["processes"][0]["role"] == "tavern" and s["processes"][0]["pid"] == os.getpid()
    gpu = s["gpu"]
    if gpu["available"]:
        assert gpu["gpus"][0]["memory_total_bytes"] > 0
    else:
        assert gpu["gpus"] == [] and gpu["reason"].startswith("No NVIDIA GPU found")


def test_pages_render_with_nav(client):
    for path in ("/", "/system"):
        html = client.get(path).get_data(as_text=True)
        for label in ("Home", "Quests", "Vault", "Oracle", "System"):
            assert f">{label}</a>" in html
