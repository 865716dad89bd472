"""Flask extensions shared by every Tavern module.

``socketio`` is initialised by :func:`tavern.app.create_app` (``async_mode="threading"``: Werkzeug threads,
WebSocket through ``simple-websocket``). One Tavern app per process: a second ``create_app`` re-binds it.
Emit from any thread with ``socketio.emit(event, payload)``; register handlers with ``@socketio.on(...)``.
"""

from __future__ import annotations

from flask_socketio import SocketIO

socketio = SocketIO()
