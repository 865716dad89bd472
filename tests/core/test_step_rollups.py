"""Chart rollups: maintained by record_step / record_eval / rollback_to, equal to a full scan at every zoom."""

from __future__ import annotations

import math
import random

import pytest

from core import step_rollups
from core.ledger import Ledger


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    # small ranges take the rollup path too, so a few thousand steps exercise every level
    monkeypatch.setattr(step_rollups, "RAW_SCAN_MAX_STEPS", 64)
    led = Ledger(tmp_path / "l.sqlite")
    yield led
    led.close()


def _step(ledger, s, loss, lr=1e-3):
    ledger.record_step(global_step=s, quest_id=None, loss=loss, learning_rate=lr, grad_norm=1.0, tokens=1,
                       tokens_per_second=1.0, example_start=0, example_end=0, example_lines=[], quest_steps=0)


def _fill(ledger, steps, rng):
    for s in steps:
        loss = float("nan") if rng.random() < 0.05 else rng.uniform(0.5, 4.0)  # NaN is stored as NULL
        _step(ledger, s, loss, lr=rng.uniform(1e-5, 1e-3))
        if s % 7 == 0:
            ledger.record_eval(s, None, rng.uniform(1.0, 3.0), 4)
            if s % 21 == 0:  # two quests evaluated at the same step
                ledger.record_eval(s, 2, rng.uniform(1.0, 3.0), 4)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def full_scan(ledger, lo, hi, width):
    """The expected buckets, brute force in Python over the raw rows (buckets aligned to ``width``)."""
    train, evals = {}, {}
    for r in ledger.query("SELECT global_step, loss, learning_rate FROM steps WHERE global_step BETWEEN ? AND ?",
                          (lo, hi)):
        train.setdefault(r["global_step"] // width, []).append(r)
    for r in ledger.query("SELECT global_step, eval_loss FROM evals WHERE global_step BETWEEN ? AND ?", (lo, hi)):
        evals.setdefault(r["global_step"] // width, []).append(r)
    t = [(_mean([r["global_step"] for r in rs]), _mean([r["loss"] for r in rs]),
          min((r["loss"] for r in rs if r["loss"] is not None), default=None),
          max((r["loss"] for r in rs if r["loss"] is not None), default=None),
          _mean([r["learning_rate"] for r in rs])) for _, rs in sorted(train.items())]
    e = [(_mean([r["global_step"] for r in rs]), _mean([r["eval_loss"] for r in rs])) for _, rs in sorted(evals.items())]
    return t, e


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def assert_history_matches_full_scan(ledger, lo, hi, max_points):
    h = ledger.history(lo, hi, max_points)
    p = step_rollups.plan(lo, hi, max_points)
    assert p.level is not None and h.bucket_steps == p.bucket_steps
    assert h.bucket_steps >= math.ceil((hi - lo + 1) / max_points)
    assert len(h.train["global_step"]) <= max_points and len(h.eval["global_step"]) <= max_points
    expected_train, expected_eval = full_scan(ledger, lo, hi, h.bucket_steps)
    got_train = list(zip(*(h.train[k] for k in ("global_step", "loss", "loss_min", "loss_max", "learning_rate")),
                         strict=True))
    got_eval = list(zip(h.eval["global_step"], h.eval["eval_loss"], strict=True))
    assert len(got_train) == len(expected_train) and len(got_eval) == len(expected_eval)
    for got, want in zip(got_train + got_eval, expected_train + expected_eval, strict=True):
        assert all(_same(g, w) for g, w in zip(got, want, strict=True)), (lo, hi, max_points, got, want)


def assert_rollups_equal_a_rebuild(ledger):
    """What record_step/record_eval/rollback_to maintained equals a set-based recomputation from raw rows."""
    def snapshot():
        return sorted(tuple(r.values()) for r in ledger.query("SELECT * FROM rollups"))

    maintained = snapshot()
    with ledger.transaction() as c:
        step_rollups.rebuild_all(c)
    rebuilt = snapshot()
    assert len(maintained) == len(rebuilt)
    for a, b in zip(maintained, rebuilt, strict=True):
        assert all(_same(x, y) if isinstance(x, float) or isinstance(y, float) else x == y
                   for x, y in zip(a, b, strict=True)), (a, b)


ZOOMS = [(1, 3000, 1500), (1, 3000, 10), (1, 3000, 37), (5, 2990, 100), (100, 1000, 50), (777, 2048, 16),
         (1024, 2047, 10), (2900, 3500, 20), (0, 10**6, 10)]


def test_rollups_equal_a_full_scan_at_every_zoom(ledger):
    rng = random.Random(7)
    _fill(ledger, range(1, 3001), rng)
    assert_rollups_equal_a_rebuild(ledger)
    for lo, hi, points in ZOOMS:
        assert_history_matches_full_scan(ledger, lo, hi, points)


def test_rollups_after_rollback_and_retraining(ledger):
    rng = random.Random(8)
    _fill(ledger, range(1, 2501), rng)
    assert ledger.rollback_to(1234) == 2501 - 1235  # a crash lost the steps after 1234
    assert ledger.history_bounds().last_step == 1234
    assert_rollups_equal_a_rebuild(ledger)
    for lo, hi, points in ZOOMS:
        assert_history_matches_full_scan(ledger, lo, min(hi, 1234) if lo <= 1234 else hi, points)
    _fill(ledger, range(1235, 3001), random.Random(9))  # trained again, with other losses
    assert_rollups_equal_a_rebuild(ledger)
    for lo, hi, points in ZOOMS:
        assert_history_matches_full_scan(ledger, lo, hi, points)
    assert ledger.rollback_to(0) == 3000  # everything lost
    assert ledger.query("SELECT COUNT(*) AS n FROM rollups")[0]["n"] == 0


def test_a_replaced_step_or_eval_is_not_counted_twice(ledger):
    for s in range(1, 200):
        _step(ledger, s, 1.0)
    _step(ledger, 100, 50.0)  # INSERT OR REPLACE of an existing step
    _step(ledger, 100, 7.0)
    ledger.record_eval(100, 3, 9.0, 1)
    ledger.record_eval(100, 3, 2.0, 1)  # replaces (same step and quest)
    assert_rollups_equal_a_rebuild(ledger)
    h = ledger.history(1, 199, 10)
    assert max(h.train["loss_max"]) == 7.0 and h.eval["eval_loss"] == [2.0]
    assert_history_matches_full_scan(ledger, 1, 199, 10)


def test_rollup_rows_hold_min_max_mean_last_per_block(ledger):
    for s, loss in [(8, 3.0), (9, float("nan")), (10, 1.0), (15, 2.0)]:  # all in block 1 of level 3
        _step(ledger, s, loss)
    row = ledger.query("SELECT * FROM rollups WHERE series=0 AND level=3 AND block=1")[0]
    assert (row["n"], row["step_sum"], row["value_count"], row["value_sum"]) == (4, 42, 3, 6.0)
    assert (row["value_min"], row["value_max"], row["last_step"], row["value_last"]) == (1.0, 3.0, 15, 2.0)
    top = ledger.query("SELECT * FROM rollups WHERE series=0 AND level=?", (step_rollups.LEVELS[-1],))
    assert len(top) == 1 and top[0]["n"] == 4


@pytest.mark.parametrize("lo,hi,points", [(0, 10**7, 1500), (123, 10**7 - 5, 10), (5, 70_000, 10_000),
                                          (0, 2**40, 10), (1, 16_384, 1500), (1, 16_385, 1500)])
def test_plans_stay_within_max_points(lo, hi, points):
    p = step_rollups.plan(lo, hi, points)
    if hi - lo + 1 <= step_rollups.RAW_SCAN_MAX_STEPS:
        assert p.level is None and p.bucket_steps == math.ceil((hi - lo + 1) / points)
        return
    assert p.level is not None and p.bucket_steps % (1 << p.level) == 0
    assert hi // p.bucket_steps - lo // p.bucket_steps + 1 <= points
    assert p.bucket_steps >= math.ceil((hi - lo + 1) / points)
    if p.bucket_steps <= 1 << step_rollups.LEVELS[-1]:
        assert p.bucket_steps < 2 * math.ceil((hi - lo + 1) / points)  # at least about half the points


@pytest.mark.parametrize("raw_limit", [64, 100_000])  # the rollup path and the raw path
def test_non_finite_values_come_back_as_none(tmp_path, monkeypatch, raw_limit):
    monkeypatch.setattr(step_rollups, "RAW_SCAN_MAX_STEPS", raw_limit)
    led = Ledger(tmp_path / "l.sqlite")
    for s in range(1, 400):
        _step(led, s, float("inf") if s == 200 else 1.0)
    h = led.history(1, 399, 20)
    i = min(range(len(h.train["global_step"])), key=lambda k: abs(h.train["global_step"][k] - 200))  # step 200's
    assert h.train["loss"][i] is None and h.train["loss_max"][i] is None and h.train["loss_min"][i] == 1.0
    others = [x for k, x in enumerate(h.train["loss"]) if k != i]
    assert others and all(x == 1.0 for x in others)
    led.close()


def test_buckets_wider_than_the_coarsest_block(ledger):
    """A range so long that a bucket spans several of the coarsest blocks: those are grouped."""
    rng = random.Random(10)
    _fill(ledger, [s * 65_537 for s in range(1, 400)], rng)  # sparse steps up to ~26M
    hi = 399 * 65_537
    p = step_rollups.plan(1, hi, 10)
    assert p.bucket_steps > 1 << step_rollups.LEVELS[-1]
    assert_history_matches_full_scan(ledger, 1, hi, 10)
    assert_history_matches_full_scan(ledger, 3_000_000, hi - 5, 7)
