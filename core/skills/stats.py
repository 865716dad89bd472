"""Statistics of promotion trials (pure Python, no dependencies).

The Wilson score interval (E. B. Wilson, "Probable inference, the law of succession, and statistical
inference", *Journal of the American Statistical Association* 22(158):209-212, 1927) for a binomial
proportion with ``k`` successes in ``n`` trials, ``p = k / n`` and the normal quantile ``z``::

    centre = (p + z² / (2n)) / (1 + z² / n)
    half   = z / (1 + z² / n) · sqrt(p (1 − p) / n + z² / (4 n²))
    lower  = centre − half

Unlike the normal ("Wald") interval it stays inside [0, 1] and is not degenerate at ``p = 0`` or ``p = 1``:
with 50 of 50 right the lower bound is 0.929, not 1.0, so a perfect small sample cannot claim certainty.
:data:`Z_95` = 1.959964 is the two-sided 95 % quantile: ``lower`` is the lower end of the 95 % Wilson
interval (a one-sided 97.5 % lower confidence bound on the true accuracy).
"""

from __future__ import annotations

import math

Z_95 = 1.959963984540054
"""The standard normal quantile Φ⁻¹(0.975): two-sided 95 %."""


def wilson_lower_bound(correct: int, n: int, z: float = Z_95) -> float:
    """Lower end of the Wilson score interval of ``correct`` successes out of ``n`` (both counts).

    Returns a float in [0, 1]; 0.0 when ``n`` is 0. Raises ``ValueError`` when ``correct`` is not in
    ``[0, n]`` or ``n`` is negative.
    """
    if n < 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0
    p = correct / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - half) / denominator)


def min_correct_for(threshold: float, n: int, z: float = Z_95) -> int | None:
    """The fewest right answers out of ``n`` whose Wilson lower bound reaches ``threshold`` (None: none does)."""
    for k in range(n + 1):
        if wilson_lower_bound(k, n, z) >= threshold:
            return k
    return None
