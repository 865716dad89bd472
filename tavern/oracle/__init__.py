"""The Oracle: chat with any checkpoint, streamed over Socket.IO, plus an OpenAI-compatible API.

Exports ``bp`` (the ``oracle`` blueprint: the page, ``/api/oracle/...`` and ``/v1/...``), ``init_oracle(app,
socketio)`` and ``close_oracle(app)``; see :mod:`tavern.oracle.routes`. They are imported lazily so that the
worker process (:mod:`tavern.oracle.worker`, which imports this package) never loads Flask.
"""

from __future__ import annotations

__all__ = ["bp", "close_oracle", "init_oracle"]


def __getattr__(name: str):
    if name in __all__:
        from tavern.oracle import routes

        return getattr(routes, name)
    raise AttributeError(f"module 'tavern.oracle' has no attribute {name!r}")
