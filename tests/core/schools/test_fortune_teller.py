"""Fortune Teller: its token weights against the documented formulas, and a quest trained with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.engine import Engine
from core.ledger import Ledger
from core.quest_queue import QuestQueue
from core.schools.fortune_teller import EPS, token_weights


def _explicit(logits, targets, weighting):
    out = []
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        z = max(row)
        p = [math.exp(v - z) for v in row]
        total = sum(p)
        p = [v / total for v in p]
        if weighting == "entropy":
            s = -sum(v * math.log(v) for v in p)
        elif weighting == "confidence":
            s = 1 - p[y]
        else:
            a, b = sorted(p, reverse=True)[:2]
            s = 1 - (a - b)
        out.append(s)
    return out


@pytest.mark.parametrize("weighting", ["entropy", "confidence", "margin"])
def test_weights_follow_the_formula_and_average_one(weighting):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 7, generator=g) * 2
    targets = torch.randint(0, 7, (12,), generator=g)
    targets[[0, 5]] = -100  # positions without loss get weight 0 and do not count in the mean
    weights, s = token_weights(logits, targets, weighting)
    keep = [i for i in range(12) if targets[i] != -100]
    expected = _explicit(logits[keep], targets[keep], weighting)
    mean = sum(e + EPS for e in expected) / len(expected)
    assert weights[keep].tolist() == pytest.approx([(e + EPS) / mean for e in expected], rel=1e-5)
    assert weights[[0, 5]].tolist() == [0.0, 0.0]
    assert weights[keep].mean().item() == pytest.approx(1.0, rel=1e-6)
    assert s[keep].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_fortune_teller_quest_trains_with_its_metric(make_realm):
    realm = make_realm(training={"packing": False, "micro_batch_size": 2},
                       schools={"oracle*.jsonl": {"school": "fortune_teller", "weighting": "confidence"}})
    ledger = Ledger(realm.ledger_path)
    records = [(i + 1, {"prompt": f"Q{i}:", "completion": f" answer {i % 5}"}) for i in range(16)]
    path = realm.root / "oracle_a.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for _, ex in records))
    qid = QuestQueue(realm, ledger).admit(path, "normal")
    ledger.update_quest(qid, format="prompt_completion")
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    assert engine.school_of(ledger.get_quest(qid)).name == "fortune_teller"
    result = engine.train_quest(qid, records)
    engine.cleanup()
    assert result.status == "completed" and result.steps >= 3 and math.isfinite(result.loss)
    metrics = ledger.step_metrics(qid)
    assert sorted(metrics) == list(range(1, result.steps + 1))
    assert all(0 < m["surprise"] <= 1 for m in metrics.values())
    ledger.close()
