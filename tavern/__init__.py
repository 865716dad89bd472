"""The Tavern: the live web dashboard of a realm (Flask + Flask-SocketIO).

``tavern.app.create_app(realm, config)`` builds it, ``tavern.server.run(realm, config)`` serves it. It reads
state from the realm's ledger and sends commands through the ledger's control channel; it never imports the
training loop. ``tavern.game`` is the one module where RPG words meet training metrics.
"""
