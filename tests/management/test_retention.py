"""Retention as a pure function: examples, and properties over random policies and histories."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from management.retention import (
    PROTECTED,
    CheckpointFacts,
    KeepReason,
    RetentionPolicy,
    best_checkpoint,
    plan_retention,
)

NOW = 1_800_000_000.0
HOUR = 3600.0


def ck(step, hours_ago=0.0, loss=None, eval_loss=None, pinned=False, has_optimizer=True):
    return CheckpointFacts(name=f"step-{step:08d}", step=step, time=NOW - hours_ago * HOUR, loss=loss,
                           eval_loss=eval_loss, pinned=pinned, has_optimizer=has_optimizer, size_bytes=1000,
                           optimizer_bytes=600 if has_optimizer else 0)


def names(decisions):
    return [d.name for d in decisions]


def test_keep_last_removes_the_rest_with_a_reason():
    plan = plan_retention([ck(s, loss=1.0) for s in (100, 200, 300, 400, 500)],
                          RetentionPolicy(keep_last=2, keep_best=0), NOW)
    # step 500 is both latest and best (ties go to the newer checkpoint)
    assert names(plan.keep) == ["step-00000400", "step-00000500"]
    assert names(plan.remove) == ["step-00000100", "step-00000200", "step-00000300"]
    assert all("not among the newest 2" in d.reasons[0] for d in plan.remove)
    assert plan.bytes_freed == 3000 + 0  # the kept ones are within keep_optimizer_last=2


def test_best_latest_pinned_every_steps_and_within_hours_are_kept_with_their_reasons():
    history = [ck(100, 50, loss=2.0, eval_loss=1.0),      # best by eval_loss
               ck(200, 40, loss=0.5),                      # best by loss, no eval_loss
               ck(300, 30, loss=3.0, pinned=True),
               ck(1000, 20, loss=3.0),                     # milestone
               ck(1100, 1, loss=3.0),                      # recent
               ck(1200, 10, loss=3.0),
               ck(1300, 0, loss=3.0)]                      # latest
    policy = RetentionPolicy(keep_last=1, keep_every_steps=1000, keep_best=1, best_metric="loss",
                             keep_within_hours=2)
    plan = plan_retention(history, policy, NOW)
    reasons = {d.step: set(d.reasons) for d in plan.keep}
    assert reasons[100] == {KeepReason.BEST.value}
    assert reasons[200] == {KeepReason.KEEP_BEST.value}
    assert reasons[300] == {KeepReason.PINNED.value}
    assert reasons[1000] == {KeepReason.KEEP_EVERY_STEPS.value}
    assert reasons[1100] == {KeepReason.KEEP_WITHIN_HOURS.value}
    assert reasons[1300] >= {KeepReason.LATEST.value, KeepReason.KEEP_LAST.value}
    assert names(plan.remove) == ["step-00001200"]


def test_optimizer_state_is_stripped_from_all_but_the_newest_kept():
    history = [ck(s, loss=1.0 + s, pinned=s == 1) for s in range(1, 7)]
    plan = plan_retention(history, RetentionPolicy(keep_last=4, keep_best=0, keep_optimizer_last=2), NOW)
    assert names(plan.keep) == ["step-00000001", "step-00000003", "step-00000004", "step-00000005",
                                "step-00000006"]
    assert names(plan.strip_optimizer) == ["step-00000001", "step-00000003", "step-00000004"]
    already = [ck(1, loss=1.0, has_optimizer=False), ck(2, loss=1.0), ck(3, loss=1.0)]
    plan = plan_retention(already, RetentionPolicy(keep_last=3, keep_optimizer_last=1), NOW)
    assert names(plan.strip_optimizer) == ["step-00000002"]


def test_eval_loss_metric_falls_back_to_loss_and_ignores_non_finite():
    history = [ck(1, loss=0.1), ck(2, loss=float("nan")), ck(3, loss=5.0)]
    assert best_checkpoint(history).step == 1
    plan = plan_retention(history, RetentionPolicy(keep_last=1, keep_best=1, best_metric="eval_loss"), NOW)
    assert names(plan.remove) == ["step-00000002"]


def test_empty_and_invalid_input():
    assert plan_retention([], RetentionPolicy(), NOW).keep == ()
    with pytest.raises(ValueError):
        plan_retention([ck(1), ck(1)], RetentionPolicy(), NOW)
    with pytest.raises(ValueError):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValueError):
        RetentionPolicy(best_metric="accuracy")


metrics = st.one_of(st.none(), st.floats(min_value=0, max_value=10, allow_nan=False),
                    st.just(float("nan")), st.just(float("inf")))


@st.composite
def histories(draw):
    steps = draw(st.lists(st.integers(min_value=0, max_value=100_000), min_size=0, max_size=30, unique=True))
    return [CheckpointFacts(name=f"step-{s:08d}", step=s, time=NOW - draw(st.floats(0, 1000)) * HOUR,
                            loss=draw(metrics), eval_loss=draw(metrics), pinned=draw(st.booleans()),
                            has_optimizer=draw(st.booleans()), size_bytes=draw(st.integers(0, 10**9)),
                            optimizer_bytes=draw(st.integers(0, 10**9))) for s in steps]


policies = st.builds(RetentionPolicy, keep_last=st.integers(1, 10), keep_every_steps=st.integers(0, 5000),
                     keep_best=st.integers(0, 5), best_metric=st.sampled_from(["eval_loss", "loss"]),
                     keep_within_hours=st.floats(0, 500), keep_optimizer_last=st.integers(1, 10))


def _vault_best(history):
    """The vault's rule, written independently: lowest finite eval_loss, else lowest finite loss; newest
    on ties."""
    for key in ("eval_loss", "loss"):
        scored = [c for c in history if getattr(c, key) is not None and math.isfinite(getattr(c, key))]
        if scored:
            low = min(getattr(c, key) for c in scored)
            return max(c.step for c in scored if getattr(c, key) == low)
    return None


@settings(max_examples=300, deadline=None)
@given(histories(), policies)
def test_latest_best_and_pinned_are_never_removed_and_every_removal_has_a_reason(history, policy):
    plan = plan_retention(history, policy, NOW)
    kept, removed = {d.step for d in plan.keep}, {d.step for d in plan.remove}
    assert kept | removed == {c.step for c in history} and not kept & removed   # a partition
    if history:
        assert max(c.step for c in history) in kept
        best = _vault_best(history)
        assert best is None or best in kept
    assert {c.step for c in history if c.pinned} <= kept
    assert all(d.reasons and all(isinstance(r, str) and r for r in d.reasons) for d in plan.remove)
    assert all(d.reasons for d in plan.keep)
    newest_kept = sorted(kept)[-policy.keep_last:] if kept else []
    assert set(sorted(c.step for c in history)[-policy.keep_last:]) <= kept and set(newest_kept) <= kept
    stripped = {d.step for d in plan.strip_optimizer}
    assert stripped <= kept and not stripped & set(sorted(kept)[-policy.keep_optimizer_last:])
    assert all(c.has_optimizer for c in history if c.step in stripped)
    protected = {d.step for d in plan.keep if PROTECTED & {KeepReason(r) for r in d.reasons}}
    assert not protected & removed
