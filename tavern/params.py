"""How the Tavern reads numbers and JSON from requests, in one place: hostile input is a 4xx, never a 500.

- **Integers** (route parts, query parameters, JSON fields) are ASCII digits (``int()`` would also take
  ``"٣"``, ``" 3 "`` and ``"1_000"``) and lie within SQLite's INTEGER range (signed 64 bits): a larger one
  would raise ``OverflowError`` inside ``sqlite3``. :func:`install` replaces Flask's ``<int:...>`` route
  converter app-wide with :class:`Int64Converter` (an id out of range is an unknown id: 404), and
  :func:`int_arg` / :func:`json_int` raise :class:`BadParameter` (400, ``{"error": ...}``).
- **JSON bodies** nested deeper than the parser can recurse are invalid JSON (``get_json(silent=True)``
  answers None; ``json.loads`` would raise ``RecursionError``).
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.routing import IntegerConverter

SQLITE_INT_MIN = -(2**63)
SQLITE_INT_MAX = 2**63 - 1
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,19}")  # 19 digits hold every int64
_SHOWN_CHARS = 40  # at most this much of a bad value is echoed back


class BadParameter(ValueError):
    """A request parameter that is not what the route accepts; the message names it (HTTP 400)."""


class Int64Converter(IntegerConverter):
    """``<int:name>``: 1 to 19 ASCII digits, at most :data:`SQLITE_INT_MAX` (anything else: no match, 404)."""

    regex = r"[0-9]{1,19}"

    def __init__(self, map, fixed_digits: int = 0, min: int | None = None, max: int | None = None,
                 signed: bool = False):
        bound = SQLITE_INT_MAX if max is None or max > SQLITE_INT_MAX else max
        super().__init__(map, fixed_digits, min, bound, signed)


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def parse_int(raw: str, name: str, lo: int = SQLITE_INT_MIN, hi: int = SQLITE_INT_MAX) -> int:
    """``raw`` (ASCII digits, optional sign) as an int in ``[lo, hi]`` (clipped to SQLite's INTEGER range).

    Raises :class:`BadParameter` naming ``name`` and the accepted range.
    """
    lo, hi = max(lo, SQLITE_INT_MIN), min(hi, SQLITE_INT_MAX)
    if not isinstance(raw, str) or not _INT_TEXT.fullmatch(raw):
        raise BadParameter(f"{name} must be an integer in [{lo}, {hi}], got {_shown(raw)}")
    value = int(raw)
    if not lo <= value <= hi:
        raise BadParameter(f"{name} must be in [{lo}, {hi}], got {_shown(raw)}")
    return value


def int_arg(name: str, default: int | None, lo: int = 0, hi: int = SQLITE_INT_MAX) -> int | None:
    """The query parameter ``name`` as an int in ``[lo, hi]``; ``default`` when absent or empty.

    Raises :class:`BadParameter` (400).
    """
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    return parse_int(raw, name, lo, hi)


def json_int(value: Any, name: str, lo: int = 0, hi: int = SQLITE_INT_MAX) -> int:
    """A JSON field that must be an integer (``true`` is not one) in ``[lo, hi]``.

    Raises :class:`BadParameter` (400).
    """
    lo, hi = max(lo, SQLITE_INT_MIN), min(hi, SQLITE_INT_MAX)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadParameter(f"{name} must be an integer in [{lo}, {hi}], got {_shown(value)}")
    if not lo <= value <= hi:
        raise BadParameter(f"{name} must be in [{lo}, {hi}], got {_shown(value)}")
    return value


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, except that JSON nested too deeply to parse is a ``ValueError`` (invalid
    JSON: ``get_json(silent=True)`` gives None, ``get_json()`` a 400) instead of a ``RecursionError``."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def install(app: Flask) -> None:
    """Bound ``<int:...>`` route parts and JSON nesting on ``app``, and answer :class:`BadParameter` with
    400. Call before registering blueprints (their rules compile their converters when added)."""
    from tavern.security import refuse

    app.url_map.converters["int"] = Int64Converter
    app.json = BoundedJSONProvider(app)

    @app.errorhandler(BadParameter)
    def _bad_parameter(exc: BadParameter):
        return refuse(400, str(exc))
