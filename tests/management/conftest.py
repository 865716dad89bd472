"""Shared fixtures of the management tests: a realm whose nano hero really trained (8 checkpoints),
trained once per session and copied for each test."""

from __future__ import annotations

import shutil

import pytest

from core.daemon import Daemon
from core.ledger import Ledger
from core.realm import Realm
from tests.conftest import FAST_CONFIG, deep_update, write_text_quest

HERO = "hero"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A realm whose nano hero trained one quest with a checkpoint every 2 steps (8 checkpoints)."""
    from core.realm import init_realm

    realm = init_realm(tmp_path_factory.mktemp("trained") / "realm",
                       overrides=deep_update(FAST_CONFIG, {"training": {"save_steps": 2},
                                                           "retention": {"keep_last": 2, "keep_best": 0}}))
    write_text_quest(realm.inbox / "quest.jsonl", 60)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    return realm


@pytest.fixture
def realm(trained, tmp_path):
    """A private copy of the trained realm."""
    dest = tmp_path / "realm"
    shutil.copytree(trained.root, dest, ignore=shutil.ignore_patterns("*.lock", "*.pid"))
    return Realm.at(dest)


def steps_of(realm):
    return [int(p.name[5:]) for p in sorted(realm.checkpoints_dir(HERO).glob("step-*"))]


def load_engine(realm):
    """An Engine set up on the realm as the daemon does at start; the caller calls cleanup()."""
    from core.engine import Engine

    ledger = Ledger(realm.ledger_path)
    engine = Engine(realm, realm.load_config(), ledger)
    engine.setup()
    return engine, ledger
