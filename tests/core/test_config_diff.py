"""core/config_diff.py, and the engine comparing the config snapshot of the checkpoint it resumes from with
the config in force: every changed key in the log and as a ``config_changed`` warning event."""

from __future__ import annotations

import json
import logging

from core.config_diff import ABSENT, REDACTED, config_changes, format_changes
from core.engine import Engine
from core.ledger import Ledger


def test_config_changes_lists_every_changed_leaf_by_dotted_key():
    old = {"training": {"learning_rate": 1e-3, "save_steps": 5, "betas": [0.9, 0.99]},
           "hero": {"name": "hero", "base_model": None}, "gone": 1}
    new = {"training": {"learning_rate": 5e-4, "save_steps": 5, "betas": [0.9, 0.999]},
           "hero": {"name": "hero", "base_model": "m"}, "added": {"x": 2}}
    assert config_changes(old, new) == [
        ("added", ABSENT, {"x": 2}), ("gone", 1, ABSENT), ("hero.base_model", None, "m"),
        ("training.betas", [0.9, 0.99], [0.9, 0.999]), ("training.learning_rate", 1e-3, 5e-4)]
    assert config_changes(new, new) == []
    assert format_changes(config_changes({"a": {"b": 1}}, {"a": {"b": 2}})) == "a.b 1 -> 2"


def test_secrets_are_reported_changed_but_never_shown():
    old = {"tavern": {"access_token": "old-secret", "port": 1}, "hooks": {"webhook_url": None}}
    new = {"tavern": {"access_token": "new-secret", "port": 1}, "hooks": {"webhook_url": "https://x/T0K3N"}}
    changes = config_changes(old, new)
    assert changes == [("hooks.webhook_url", None, REDACTED), ("tavern.access_token", REDACTED, REDACTED)]
    assert "secret" not in format_changes(changes) and "T0K3N" not in format_changes(changes)


def test_resuming_with_a_changed_config_logs_and_records_every_changed_key(make_realm, caplog):
    realm = make_realm()
    ledger = Ledger(realm.ledger_path)
    try:
        engine = Engine(realm, realm.load_config(), ledger)
        engine.setup()
        engine.save_checkpoint("test")
        engine.cleanup()

        engine = Engine(realm, realm.load_config(), ledger)  # same config: nothing to say
        engine.setup()
        engine.cleanup()
        assert not [e for e in ledger.events() if e["kind"] == "config_changed"]

        config = json.loads(realm.config_path.read_text())
        config["training"].update(learning_rate=5e-4, save_steps=7)
        config["tavern"] = {**config.get("tavern", {}), "access_token": "s3cret-t0ken"}
        realm.config_path.write_text(json.dumps(config))
        with caplog.at_level(logging.WARNING, logger="core.engine"):
            engine = Engine(realm, realm.load_config(), ledger)
            engine.setup()
            engine.cleanup()
        [event] = [e for e in ledger.events() if e["kind"] == "config_changed"]
        assert event["level"] == "warning" and "step-00000000" in event["message"]
        changes = {c["key"]: (c["old"], c["new"]) for c in json.loads(event["data"])["changes"]}
        assert changes == {"training.learning_rate": (1e-3, 5e-4), "training.save_steps": (5, 7),
                           "tavern.access_token": (None, REDACTED)}
        logged = [r.getMessage() for r in caplog.records if r.name == "core.engine"]
        assert any("training.learning_rate 0.001 -> 0.0005" in m and "training.save_steps 5 -> 7" in m
                   and "tavern.access_token None -> (redacted)" in m for m in logged), logged
        assert not any("s3cret" in m for m in logged) and "s3cret" not in event["message"] + event["data"]
    finally:
        ledger.close()
