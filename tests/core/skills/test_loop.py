"""The hero loop's parts on a real realm and ledger: what idle generation writes, the pending cap, the
weighted pick, the review share, and the trial schedule counted from the steps table."""

from __future__ import annotations

import json
from collections import Counter

from core.ledger import Ledger, QuestState
from core.realm import init_realm
from core.skills.binary import BinarySkill
from core.skills.loop import HeroLoop, generated_items, is_generated, pick_skill, skill_quest_glob
from tests.conftest import FAST_CONFIG, deep_update


def _loop(tmp_path, **sections):
    realm = init_realm(tmp_path / "realm", overrides=deep_update(FAST_CONFIG, {
        "idle_generation": {"enabled": True, "examples_per_quest": 40, "max_pending_quests": 2}, **sections}))
    ledger = Ledger(realm.ledger_path)
    loop = HeroLoop(realm, realm.load_config(), ledger, idle_check_interval_seconds=0)
    loop.start(0)
    return realm, ledger, loop


def test_idle_writes_quests_into_the_low_inbox_until_the_cap(tmp_path):
    realm, ledger, loop = _loop(tmp_path)
    first, second = loop.when_idle(), loop.when_idle()
    assert first.parent == realm.inbox / "low" and first.name == "skill-BIN-L0-idle000001.jsonl"
    assert second.name == "skill-BIN-L0-idle000002.jsonl"
    assert loop.when_idle() is None and loop.pending_generated() == 2  # the cap: nothing more is written
    records = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(records) == 40 and {r["skill"] for r in records} == {"BIN"} and {r["level"] for r in records} == {0}
    assert records[0]["prompt"][0]["role"] == "user" and records[0]["completion"][0]["role"] == "assistant"
    assert first.read_text() != second.read_text()  # a new seed per quest: never skipped as a duplicate
    assert [e["kind"] for e in ledger.events()].count("quest_generated") == 2
    first.unlink()  # taken by the watcher (here: removed): room for one more
    assert loop.when_idle().name == "skill-BIN-L0-idle000003.jsonl"
    ledger.close()


def test_generation_is_off_when_disabled_and_for_mastered_skills(tmp_path):
    realm, ledger, loop = _loop(tmp_path, idle_generation={"enabled": False})
    assert loop.when_idle() is None and not list((realm.inbox / "low").iterdir())
    ledger.close()
    realm, ledger, loop = _loop(tmp_path / "b", skills={"priorities": {"BIN": 0.0}})
    assert loop.when_idle() is None  # weight 0: not practised
    ledger.close()


def test_an_idle_daemon_looks_at_most_once_a_second(tmp_path):
    realm, ledger, loop = _loop(tmp_path)
    loop.idle_check_interval_seconds = 60.0
    assert loop.when_idle() is not None  # the first look writes
    (realm.inbox / "low" / "skill-BIN-L0-idle000001.jsonl").unlink()
    assert loop.when_idle() is None  # within the interval: no look at all
    ledger.close()


def test_pick_skill_follows_the_weights():
    counts: Counter = Counter()
    for _ in range(30):
        counts[pick_skill({"BIN": 2.0, "LETTERS": 1.0}, counts)] += 1
    assert counts == {"BIN": 20, "LETTERS": 10}
    assert pick_skill({}, {}) is None


def test_review_share_mixes_lower_levels_in():
    items = generated_items(BinarySkill(), 3, 400, 0.25, "k")
    levels = Counter(it.level for it in items)
    assert levels == {3: 300, 0: 34, 1: 33, 2: 33}
    assert [it.level for it in items[:50]].count(3) < 50  # shuffled, not in blocks
    assert Counter(it.level for it in generated_items(BinarySkill(), 0, 50, 0.25, "k")) == {0: 50}
    assert generated_items(BinarySkill(), 3, 40, 0.5, "k") == generated_items(BinarySkill(), 3, 40, 0.5, "k")


def test_generated_names_and_skill_steps(tmp_path):
    realm, ledger, loop = _loop(tmp_path, skills={"trial_every_steps": 3})
    assert is_generated({"name": "skill-BIN-L2-idle000004.jsonl"})
    assert not is_generated({"name": "skill-BIN-L2-mine.jsonl"}) and not is_generated({"name": "a.jsonl"})
    names = ("skill-BIN-L0-idle000001.jsonl", "skill-BINX-L0-k.jsonl", "other.jsonl")
    for i, name in enumerate(names, start=1):
        ledger.execute("INSERT INTO quests(name, stored_name, priority, state, created_at, updated_at) "
                       "VALUES (?,?,?,?,?,?)", (name, f"{i}-{name}", "low", QuestState.COMPLETED.value, 0, 0))
    for step, quest_id in [(1, 1), (2, 2), (3, 1), (4, 3), (5, 1)]:
        ledger.record_step(global_step=step, quest_id=quest_id, loss=1.0, learning_rate=1e-3, grad_norm=1.0,
                           tokens=10, tokens_per_second=1.0, example_start=0, example_end=1,
                           example_lines=[1], quest_steps=1)
    assert ledger.steps_of_quests_named(skill_quest_glob("BIN"), -1) == 3  # BINX is another skill
    assert ledger.steps_of_quests_named(skill_quest_glob("BIN"), 3) == 1
    assert loop.steps_since_trial("BIN") == 3 and loop.due() == ["BIN"]
    ledger.close()


def test_generation_pauses_while_the_newest_generated_quest_failed(tmp_path):
    realm, ledger, loop = _loop(tmp_path)
    ledger.execute("INSERT INTO quests(name, stored_name, priority, state, error, created_at, updated_at) "
                   "VALUES (?,?,?,?,?,?,?)", ("skill-BIN-L0-idle000001.jsonl", "1-x", "low",
                                              QuestState.FAILED.value, "rejected: too long", 0, 0))
    assert loop.when_idle() is None and loop.when_idle() is None  # no stream of failing quests
    paused = [e for e in ledger.events() if e["kind"] == "quest_generation_paused"]
    assert len(paused) == 1 and "too long" in paused[0]["message"]
    ledger.execute("UPDATE quests SET state=? WHERE id=1", (QuestState.REMOVED.value,))
    assert loop.when_idle() is not None  # removed: generation resumes
    ledger.close()
