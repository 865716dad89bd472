"""``GET /metrics`` (Prometheus): parsed with prometheus_client's own parser, every value checked against the
real ledger the daemon stand-in writes; the Tavern's Host and token rules apply."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.config import RealmConfig
from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue
from tavern.app import close_app, create_app
from tests.conftest import write_text_quest
from tests.tavern.conftest import LedgerWriter

TOKEN = "metrics-token-with-enough-entropy"


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_parse_and_match_the_ledger(client, tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    try:
        queue = QuestQueue(tavern_realm, ledger)
        for i in range(3):
            queue.admit(write_text_quest(tavern_realm.root / f"q{i}.jsonl", 4), "high" if i else "low")
        queue.transition(1, QuestState.QUEUED)
        queue.transition(2, QuestState.QUEUED)
        empty = scrape(client)
        assert ("realm_loss", ()) not in empty and ("realm_last_checkpoint_age_seconds", ()) not in empty
        assert empty[("realm_daemon_up", ())] == 0.0
        writer = LedgerWriter(ledger, quest_id=1)
        for _ in range(7):
            writer.step()
        writer.heartbeat()
        ledger.event("checkpoint_saved", "checkpoint step-00000005 saved", step=5, path="x", reason="save_steps")
        saved_at = time.time()
        got = scrape(client)
        last = ledger.last_step()
    finally:
        ledger.close()
    assert got[("realm_global_step", ())] == 7
    assert got[("realm_loss", ())] == pytest.approx(last["loss"])
    assert got[("realm_learning_rate", ())] == pytest.approx(last["learning_rate"])
    assert got[("realm_grad_norm", ())] == pytest.approx(last["grad_norm"])
    assert got[("realm_tokens_per_second", ())] == pytest.approx(512.0)
    assert got[("realm_eval_loss", ())] > 0
    assert got[("realm_quests", (("state", "queued"),))] == 2
    assert got[("realm_quests", (("state", "validating"),))] == 1
    assert got[("realm_quests", (("state", "completed"),))] == 0
    assert got[("realm_queued_quests", (("priority", "high"),))] == 1
    assert got[("realm_queued_quests", (("priority", "low"),))] == 1
    assert got[("realm_queued_quests", (("priority", "normal"),))] == 0
    assert got[("realm_daemon_up", ())] == 1.0
    assert got[("realm_last_checkpoint_global_step", ())] == 5
    assert 0 <= got[("realm_last_checkpoint_age_seconds", ())] <= time.time() - saved_at + 1


def test_openmetrics_is_served_when_asked(client):
    resp = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.get_data(as_text=True).rstrip().endswith("# EOF")


def test_metrics_follow_the_tavern_security_rules(client, tavern_realm):
    assert client.get("/metrics", headers={"Host": "attacker.example:8888"}).status_code == 403
    config = RealmConfig.model_validate({"tavern": {"access_token": TOKEN, "host": "0.0.0.0"}})
    app = create_app(tavern_realm, config, testing=True)
    try:
        c = app.test_client()
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert ("realm_global_step", ()) in scrape(c, Authorization=f"Bearer {TOKEN}")
    finally:
        close_app(app)


def test_gpu_memory_is_exported_per_gpu_when_nvml_answers(client, monkeypatch):
    """NVML is absent on this machine: the reading is replaced by the shape `gpu_info` returns on a GPU
    host (tavern/pages/system.py), to check the export; without a GPU no gpu metric is reported at all."""
    import tavern.pages.system as system

    assert not any(name.startswith("realm_gpu_") for name, _ in scrape(client)) or system.gpu_info()["available"]
    reading = {"available": True, "driver_version": "x", "reason": None, "gpus": [
        {"index": 0, "name": "NVIDIA H200", "utilization_percent": 87, "memory_used_bytes": 5 * 2**30,
         "memory_total_bytes": 141 * 2**30, "temperature_c": 40, "power_w": 300.0, "power_limit_w": 700.0}]}
    monkeypatch.setattr(system, "gpu_info", lambda: reading)
    got = scrape(client)
    labels = (("gpu", "0"), ("name", "NVIDIA H200"))
    assert got[("realm_gpu_memory_used_bytes", labels)] == 5 * 2**30
    assert got[("realm_gpu_memory_total_bytes", labels)] == 141 * 2**30
    assert got[("realm_gpu_utilization_percent", labels)] == 87
