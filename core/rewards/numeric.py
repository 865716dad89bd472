"""Numeric-answer rewards (math word problems, e.g. GSM8K).

GSM8K solutions end with ``#### N`` (``N`` the final answer, possibly ``1,000``, ``-3`` or ``2.50``).
:func:`final_number` reads the answer of a text: the first number after the last ``####`` when there is
one, else the last number in the text. Normalisation: thousands separators (``1,234``), a leading ``$``
and a trailing ``.`` are ignored, a minus sign (``-`` or ``−``) makes it negative, and numbers compare
as exact rationals (``2.50`` equals ``2.5``; fractions such as ``5/2`` are not read as one number), so
formatting never decides correctness. A number glued to letters (``v2``) is not an answer.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
_MARK = "####"


def parse_number(text: str) -> Fraction | None:
    """The value of one number written as ``-1,234.50``, ``$3``, ``7.`` (surrounding spaces allowed), or None."""
    m = _NUMBER.fullmatch(text.strip().rstrip("."))
    return _value(m) if m else None


def _value(m: re.Match) -> Fraction | None:
    sign = -1 if m.group(0).lstrip().startswith(("-", "−")) else 1
    try:
        return sign * Fraction(Decimal(m.group(1).replace(",", "") + (m.group(2) or "")))
    except (InvalidOperation, ValueError):
        return None


def final_number(text: str) -> Fraction | None:
    """The final answer of ``text`` as an exact rational: the first number after the last ``####``, else
    the last number anywhere; None when there is no number (see the module doc for the normalisation)."""
    if _MARK in text:
        m = _NUMBER.search(text.rsplit(_MARK, 1)[1])
        return _value(m) if m else None
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - keep the last match
        pass
    return _value(last) if last else None


def numeric_answer(prompt: str, completion: str, *, answer: str, **_) -> float:
    """1.0 when the final number of ``completion`` equals the final number of the reference ``answer``
    (see :func:`final_number`), else 0.0 (also when the completion has no number).

    Raises ``ValueError`` when the reference has no number (a data error, not a wrong answer).
    """
    expected = final_number(answer)
    if expected is None:
        raise ValueError(f"the reference answer has no number: {answer[-80:]!r}")
    return float(final_number(completion) == expected)
