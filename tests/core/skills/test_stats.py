"""The Wilson lower bound (Wilson 1927) against its defining equation and published values."""

import math

import pytest

from core.skills.stats import Z_95, min_correct_for, wilson_lower_bound


@pytest.mark.parametrize("k,n", [(0, 30), (1, 30), (15, 30), (29, 30), (30, 30), (46, 50), (50, 50), (81, 263),
                                 (999, 1000)])
def test_the_bound_solves_the_wilson_score_equation(k, n):
    """The Wilson bounds are the p with (k/n − p)² = z² p (1 − p) / n; the lower one is at most k/n."""
    low = wilson_lower_bound(k, n)
    p_hat = k / n
    assert 0.0 <= low <= p_hat
    assert (p_hat - low) ** 2 == pytest.approx(Z_95 ** 2 * low * (1 - low) / n, abs=1e-12)


def test_published_values():
    # 10 of 10: the classic 95 % Wilson lower bound 0.7225 (3 of 3 would be 0.4385)
    assert wilson_lower_bound(10, 10) == pytest.approx(0.7225, abs=1e-4)
    assert wilson_lower_bound(3, 3) == pytest.approx(0.4385, abs=1e-4)
    assert wilson_lower_bound(0, 10) == 0.0
    assert wilson_lower_bound(50, 50) == pytest.approx(1 / (1 + Z_95 ** 2 / 50))


def test_more_samples_tighten_the_bound_at_the_same_accuracy():
    bounds = [wilson_lower_bound(int(0.9 * n), n) for n in (30, 50, 100, 1000)]
    assert bounds == sorted(bounds) and bounds[-1] < 0.9


def test_promotion_arithmetic_of_the_default_config():
    assert min_correct_for(0.8, 50) == 46  # 46/50 = 92 % right is the least that promotes by default
    assert wilson_lower_bound(45, 50) < 0.8 <= wilson_lower_bound(46, 50)
    assert min_correct_for(0.95, 50) is None


@pytest.mark.parametrize("k,n", [(-1, 10), (11, 10), (0, -1)])
def test_bad_counts_raise(k, n):
    with pytest.raises(ValueError):
        wilson_lower_bound(k, n)


def test_zero_samples_give_no_evidence():
    assert wilson_lower_bound(0, 0) == 0.0 and not math.isnan(wilson_lower_bound(0, 0))
