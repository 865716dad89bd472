"""Home: the battle (blueprint ``home``).

``GET /`` renders the page; ``static/js/home.js`` fills it from ``/api/status``, ``/api/history`` and
``/api/events`` and keeps it live from the ``step``, ``eval``, ``event``, ``status``, ``checkpoint``,
``command`` and ``history_reset`` Socket.IO events. The control buttons post to ``/api/controls/<command>``.
"""

from __future__ import annotations

from flask import Blueprint, render_template

from tavern.pages.controls import COMMANDS

bp = Blueprint("home", __name__)


@bp.get("/")
def index():
    return render_template("home.html", commands=COMMANDS)
