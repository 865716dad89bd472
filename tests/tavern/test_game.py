"""The game formulas, and /api/status recomputed independently from the ledger's metrics."""

from __future__ import annotations

import math
import os

import pytest

from core.ledger import Ledger, QuestState
from core.quest_queue import QuestQueue
from tavern import game


@pytest.mark.parametrize("xp, level", [(0, 1), (49, 1), (50, 2), (149, 2), (150, 3), (2249, 9), (2250, 10),
                                       (9500, 20), (61250, 50), (61249, 49)])
def test_level_curve_table(xp, level):
    assert game.level_for_xp(xp) == level


def test_level_is_monotonic_and_exact_at_every_boundary():
    prev = 1
    for level in range(1, 300):
        start = game.xp_for_level(level)
        assert game.level_for_xp(start) == level
        if level > 1:
            assert game.level_for_xp(start - 1) == level - 1
        assert game.level_for_xp(start) >= prev
        prev = level


@pytest.mark.parametrize("loss, stat", [(0.0, 100), (0.5, 61), (1.0, 37), (2.0, 14), (5.0, 1), (12.0, 0)])
def test_stat_from_loss(loss, stat):
    assert game.stat_from_loss(loss) == stat


def test_stats_without_metrics_are_none_not_zero():
    assert game.stat_from_loss(None) is None
    assert game.stat_from_loss(float("nan")) is None
    assert game.attack([]) is None
    assert game.defense(None) is None


def test_attack_uses_the_mean_of_the_last_20_finite_losses():
    losses = [9.0] * 5 + [1.0] * 20 + [float("nan")]
    assert game.attack(losses) == round(100 * math.exp(-1.0))


@pytest.mark.parametrize("grad_norm, zone", [(0.1, "calm"), (0.5, "focused"), (0.99, "focused"), (1.0, "strained"),
                                             (3.9, "strained"), (4.0, "overwhelmed"), (float("inf"), "overwhelmed")])
def test_strain_zones(grad_norm, zone):
    assert game.strain_zone(game.strain(grad_norm, 1.0)) == zone


def test_non_finite_loss_is_overwhelmed():
    assert game.strain_zone(0.1, float("nan")) == "overwhelmed"
    assert game.hero_stats(3, [1.0, float("inf")], None, 0.1, 1.0).strain_zone == "overwhelmed"


def test_titles():
    assert [game.title_for_level(x) for x in (1, 4, 5, 19, 20, 50, 99)] == [
        "Newborn", "Newborn", "Apprentice", "Squire", "Knight", "Hero of the Realm", "Legend"]


def test_formula_table_and_glossary():
    md = game.formula_table_markdown()
    for word in ("XP", "level", "ATK", "DEF", "title", "strain", "hero", "quest", "vault", "oracle"):
        assert f"| {word} |" in md or f"| {word} " in md, word
    assert game.GLOSSARY["hero"].startswith("the model")
    assert "global_step" in game.GLOSSARY["XP"]


def test_negative_inputs_raise():
    with pytest.raises(ValueError):
        game.xp_from_global_step(-1)
    with pytest.raises(ValueError):
        game.level_for_xp(-5)


# /api/status recomputed from the ledger ---------------------------------------------------------
def test_every_number_of_api_status_recomputed_from_the_ledger(client, tavern_realm):
    ledger = Ledger(tavern_realm.ledger_path)
    path = tavern_realm.inbox / "q.jsonl"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    queue = QuestQueue(tavern_realm, ledger)
    qid = queue.admit(path)
    queue.transition(qid, QuestState.QUEUED, format="text", examples_total=1000)
    queue.transition(qid, QuestState.PROCESSING)
    losses = [3.0 - 0.01 * i for i in range(137)]
    for i, loss in enumerate(losses, start=1):
        ledger.record_step(global_step=i, quest_id=qid, loss=loss, learning_rate=1e-4 * (1 + i % 3),
                           grad_norm=0.3 + 0.01 * i, tokens=100, tokens_per_second=1000.0 + i,
                           example_start=(i - 1) * 5, example_end=i * 5, example_lines=[], quest_steps=i)
    ledger.record_eval(100, qid, 2.25, 16)
    ledger.record_eval(130, qid, 2.10, 16)
    ledger.set_value("daemon", {"state": "training", "pid": os.getpid(), "global_step": 137, "quest_id": qid,
                                "hero": {"name": "hero", "architecture": "LlamaForCausalLM", "parameters": 260000,
                                         "base_model": "stories260K", "newborn": False},
                                "tokens_per_second": 1137.0, "eta_seconds": 42.0, "last_checkpoint": None})
    st = client.get("/api/status").get_json()

    # recompute independently: plain math on the raw rows, no tavern.game calls
    rows = ledger.query("SELECT * FROM steps ORDER BY global_step")
    step = rows[-1]["global_step"]
    assert st["metrics"]["global_step"] == step == 137
    hero = st["hero"]
    assert hero["xp"] == step
    level = max(L for L in range(1, 1000) if 25 * L * (L - 1) <= step)
    assert hero["level"] == level == 2
    assert hero["xp_level_start"] == 25 * level * (level - 1)
    assert hero["xp_next_level"] == 25 * (level + 1) * level
    assert hero["xp_progress"] == pytest.approx((step - 25 * level * (level - 1)) / (50 * level))
    window = [r["loss"] for r in rows[-20:]]
    mean_loss = sum(window) / 20
    assert st["metrics"]["loss_window_mean"] == pytest.approx(mean_loss)
    assert hero["atk"] == round(100 * math.exp(-mean_loss))
    assert hero["def"] == round(100 * math.exp(-2.10))
    assert st["metrics"]["eval_loss"] == 2.10 and st["metrics"]["eval_global_step"] == 130
    assert hero["title"] == "Newborn"  # level 2 < 5
    assert hero["strain"] == pytest.approx(rows[-1]["grad_norm"] / 1.0)
    assert hero["strain_zone"] == "strained"  # 1.67 is in [1, 4)
    assert st["metrics"]["loss"] == rows[-1]["loss"]
    assert st["metrics"]["learning_rate"] == rows[-1]["learning_rate"]
    assert st["metrics"]["grad_norm"] == rows[-1]["grad_norm"]
    assert st["metrics"]["tokens_per_second"] == 1137.0
    q = st["quest"]
    assert q["id"] == qid and q["examples_trained"] == 137 * 5 and q["examples_total"] == 1000
    assert q["progress"] == pytest.approx(137 * 5 / 1000)
    assert q["eta_seconds"] == 42.0  # the daemon's own estimate while it trains
    assert st["queue"]["processing"] == 1
    assert hero["name"] == "hero" and hero["parameters"] == 260000 and hero["newborn"] is False
    assert st["daemon"]["display_state"] == "training" and st["daemon"]["alive"] is True
    ledger.close()


def test_status_without_a_daemon_says_so(client):
    st = client.get("/api/status").get_json()
    assert st["daemon"]["display_state"] == "not running"
    assert st["hero"]["level"] == 1 and st["hero"]["atk"] is None and st["hero"]["def"] is None
    assert st["quest"] is None and st["last_checkpoint"] is None


def test_stale_heartbeat_and_dead_pid(client, tavern_realm):
    import time

    ledger = Ledger(tavern_realm.ledger_path)
    ledger.set_value("daemon", {"state": "training", "pid": os.getpid()})
    ledger.execute("UPDATE kv SET updated_at=? WHERE key='daemon'", (time.time() - 120,))
    assert client.get("/api/status").get_json()["daemon"]["display_state"] == "not responding"
    ledger.set_value("daemon", {"state": "training", "pid": 2**22 + 12345})  # no such process
    assert client.get("/api/status").get_json()["daemon"]["display_state"] == "not running"
    ledger.close()


@pytest.mark.parametrize("doc_name", ["docs/tavern.md", "README.md"])
def test_docs_formula_table_is_in_sync(doc_name):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / doc_name).read_text(encoding="utf-8")
    block = doc.split("<!-- game-formulas:start -->\n", 1)[1].split("<!-- game-formulas:end -->", 1)[0]
    assert block == game.formula_table_markdown(), f"regenerate the table in {doc_name}"
