"""Campaigns on a real ledger: stages advance on each stop condition, a restart continues the stage, a
changed config is handled, the stage's quests train first, its skills replace skills.priorities, and a
daemon run advances a stage and shows it in status."""

from __future__ import annotations

import json
import time

import pytest

from core.campaigns import Campaign, campaign_status
from core.config import CampaignConfig, ConfigError, load_config
from core.ledger import Ledger, QuestState, TrialRecord
from core.quest_queue import QuestQueue
from core.realm import init_realm
from core.skills.loop import HeroLoop
from tests.conftest import FAST_CONFIG, cli, deep_update, write_text_quest

STAGES = [
    {"name": "warm-up", "quests": ["warmup*"], "until": {"steps": 5}},
    {"name": "BIN 1", "skills": {"BIN": 1.0}, "until": {"skill_level": {"BIN": 1}}},
    {"name": "BIN sure", "skills": {"BIN": 1.0}, "until": {"accuracy": 0.9}},
    {"name": "polish", "school": "sft", "quests": ["polish*"], "until": {"eval_loss_patience": 2}},
]


def _trial(correct: int, step: int, promoted: bool, level: int = 0, n: int = 50) -> TrialRecord:
    return TrialRecord(hero="hero", skill="BIN", level=level, level_after=level + int(promoted), n=n,
                       correct=correct, accuracy=correct / n, lower_bound=0.85 if promoted else 0.5, threshold=0.8,
                       promoted=promoted, global_step=step, checkpoint=None, seed=1, duration_seconds=0.1,
                       time=time.time())


def _quest(ledger: Ledger, name: str, state: QuestState = QuestState.QUEUED, priority: str = "normal") -> int:
    ledger.execute("INSERT INTO quests(name, stored_name, priority, state, format, deferred, created_at, updated_at) "
                   "VALUES (?,?,?,?,?,?,?,?)", (name, f"x-{name}", priority, state.value, "prompt_completion", 0, 0, 0))
    return ledger.query("SELECT MAX(id) AS m FROM quests")[0]["m"]


def _campaign(ledger: Ledger, stages=STAGES, inbox=None) -> Campaign:
    return Campaign(CampaignConfig.model_validate({"enabled": True, "stages": stages}), ledger, "hero", inbox)


def test_stages_advance_on_each_stop_condition(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        _quest(ledger, "warmup-stories.jsonl")
        _quest(ledger, "polish-1.jsonl")
        campaign = _campaign(ledger)
        campaign.start(0)
        assert campaign.current.name == "warm-up" and campaign.skill_priorities() == {}
        assert not campaign.check(4, force=True)  # 4 of 5 steps
        assert campaign.check(5, force=True) and campaign.current.name == "BIN 1"
        assert campaign.skill_priorities() == {"BIN": 1.0}
        ledger.record_trial(_trial(30, 8, promoted=False))
        assert not campaign.check(8, force=True)
        ledger.record_trial(_trial(47, 10, promoted=True))
        assert campaign.check(10, force=True) and campaign.current.name == "BIN sure"
        assert not campaign.check(11, force=True)  # the trial that promoted came before this stage
        ledger.record_trial(_trial(44, 12, promoted=False, level=1))
        assert not campaign.check(12, force=True)  # 0.88 < 0.9
        ledger.record_trial(_trial(46, 14, promoted=True, level=1))
        assert campaign.check(14, force=True) and campaign.current.name == "polish"
        for step, loss in [(13, 0.1), (16, 1.0), (18, 0.8), (20, 0.85)]:  # step 13: before the stage
            ledger.record_eval(step, None, loss, 10)
        assert not campaign.check(20, force=True)  # 0.85 is 1 evaluation after the best (0.8)
        ledger.record_eval(22, None, 0.9, 10)
        assert campaign.check(22, force=True) and campaign.current is None and campaign.state.finished
        history = campaign.state.history
        assert [(h["name"], h["started_step"], h["ended_step"]) for h in history] == [
            ("warm-up", 0, 5), ("BIN 1", 5, 10), ("BIN sure", 10, 14), ("polish", 14, 22)]
        assert "not improved over 2" in history[-1]["reason"]
        kinds = [e["kind"] for e in ledger.events() if e["kind"].startswith("campaign")]
        assert kinds == ["campaign_started", "campaign_stage", "campaign_stage", "campaign_stage", "campaign_finished"]
        assert not campaign.check(30, force=True)
    finally:
        ledger.close()


def test_a_restart_continues_the_stage_and_a_changed_config_is_handled(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    _quest(ledger, "warmup-a.jsonl")
    campaign = _campaign(ledger)
    campaign.start(0)
    campaign.check(7, force=True)
    assert campaign.current.name == "BIN 1"
    ledger.close()
    ledger = Ledger(path)  # the daemon restarted (another process, same ledger)
    try:
        again = _campaign(ledger)
        again.start(40)
        assert again.current.name == "BIN 1" and again.state.started_step == 7
        assert [e["kind"] for e in ledger.events()].count("campaign_started") == 1
        # a stage added at the end: same position, same name -> goes on
        more = _campaign(ledger, [*STAGES, {"name": "extra", "skills": {"LETTERS": 1.0},
                                            "until": {"steps": 10}}])
        more.start(41)
        assert more.current.name == "BIN 1" and more.state.started_step == 7
        assert ledger.events_of_kind("campaign_changed", 1)[0]["level"] == "warning"
        # the stage it was in is gone from its position -> starts over
        other = _campaign(ledger, [{"name": "only", "skills": {"BIN": 1.0}, "until": {"steps": 3}}])
        other.start(42)
        assert other.current.name == "only" and other.state.started_step == 42 and other.state.stage == 0
    finally:
        ledger.close()


def test_a_stage_with_nothing_left_to_train_ends_and_inbox_files_count(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    inbox = tmp_path / "inbox"
    (inbox / "normal").mkdir(parents=True)
    try:
        (inbox / "normal" / "warmup-late.jsonl").write_text('{"text": "x"}\n')
        campaign = _campaign(ledger, inbox=inbox)
        campaign.start(0)
        assert not campaign.check(1, force=True)  # a warm-up file waits in the inbox
        (inbox / "normal" / "warmup-late.jsonl").unlink()
        assert campaign.check(1, force=True) and campaign.current.name == "BIN 1"
        assert "nothing left to train" in campaign.state.history[0]["reason"]
    finally:
        ledger.close()


def test_the_stage_quests_train_first_and_its_skills_are_practised(tmp_path):
    realm = init_realm(tmp_path / "realm", overrides=deep_update(FAST_CONFIG, {
        "idle_generation": {"enabled": True, "examples_per_quest": 20},
        "campaign": {"enabled": True, "stages": [
            {"name": "letters", "skills": {"LETTERS": 1.0}, "quests": ["mine*"], "until": {"steps": 100}}]}}))
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    try:
        campaign = Campaign(config.campaign, ledger, "hero", realm.inbox)
        campaign.start(0)
        queue = QuestQueue(realm, ledger)
        _quest(ledger, "user.jsonl", priority="high")
        mine = _quest(ledger, "mine.jsonl", priority="low")
        assert queue.next_trainable({"prompt_completion"}, first=campaign.is_stage_quest)["id"] == mine
        assert queue.next_trainable({"prompt_completion"})["name"] == "user.jsonl"  # without a campaign
        loop = HeroLoop(realm, config, ledger, idle_check_interval_seconds=0)
        loop.campaign = campaign
        loop.start(0)
        assert loop.when_idle().name.startswith("skill-LETTERS-L0-")  # skills.priorities says BIN
        assert campaign.is_stage_quest({"name": "skill-LETTERS-L0-idle000001.jsonl"})
        assert campaign.is_stage_quest({"name": "spar-LETTERS-L0-r000001-s0.jsonl"})
        assert not campaign.is_stage_quest({"name": "skill-BIN-L0-idle000001.jsonl"})
        # the daemon's order: the stage's quests, other quests, generated ones (the stage's too) last
        from core.daemon import Daemon
        from core.skills.loop import is_generated

        daemon = Daemon(realm, config)
        daemon.campaign = campaign
        ledger.execute("UPDATE quests SET state=? WHERE id=?", (QuestState.COMPLETED.value, mine))
        generated = _quest(ledger, "skill-LETTERS-L0-idle000001.jsonl", priority="high")
        pick = queue.next_trainable({"prompt_completion"}, last=is_generated, first=daemon._stage_quest)
        assert pick["name"] == "user.jsonl"
        ledger.execute("UPDATE quests SET state=? WHERE name=?", (QuestState.COMPLETED.value, "user.jsonl"))
        assert queue.next_trainable({"prompt_completion"}, last=is_generated, first=daemon._stage_quest)["id"] == generated
    finally:
        ledger.close()


@pytest.mark.parametrize("campaign,problem", [
    ({"enabled": True}, "needs stages or a preset"),
    ({"preset": "warmup-bin", "stages": [{"name": "a", "quests": ["x"], "until": {"steps": 1}}]}, "not both"),
    ({"stages": [{"name": "a", "quests": ["x"], "until": {"steps": 1, "accuracy": 0.5}}]}, "exactly one"),
    ({"stages": [{"name": "a", "school": "alchemy", "quests": ["x"], "until": {"steps": 1}}]}, "alchemy"),
    ({"stages": [{"name": "a", "until": {"steps": 1}}]}, "names skills and/or quests"),
    ({"stages": [{"name": "a", "quests": ["x"], "until": {"accuracy": 0.5}}]}, "needs the stage's skills"),
    ({"stages": [{"name": "a", "quests": ["x"], "until": {"skill_level": {"BIN": 0}}}]}, "1..100"),
    ({"preset": "nope"}, "campaign.preset"),
])
def test_campaign_config_errors_name_the_key(tmp_path, campaign, problem):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"campaign": campaign}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert problem in str(err.value) and "campaign" in str(err.value)


def test_the_preset_and_the_status(tmp_path):
    config = CampaignConfig.model_validate({"enabled": True, "preset": "warmup-bin"})
    names = [(st.name, st.school, st.until.model_dump(exclude_none=True)) for st in config.resolved_stages()]
    assert names == [("warm-up", "sft", {"steps": 200}), ("BIN levels", "sft", {"skill_level": {"BIN": 3}})]
    assert campaign_status(CampaignConfig(), None) is None
    before = campaign_status(config, None)
    assert before["stage"] == 1 and before["name"] == "warm-up" and before["started_step"] is None
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        campaign = Campaign(config, ledger, "hero")
        campaign.start(3)
        campaign.check(3, force=True)  # no warm-up quest: the stage passes
        status = campaign_status(config, ledger)
        assert status["stage"] == 2 and status["name"] == "BIN levels" and status["skills"] == {"BIN": 1.0}
        assert status["until"] == {"skill_level": {"BIN": 3}} and status["started_step"] == 3
        assert status["history"][0]["name"] == "warm-up" and status["preset"] == "warmup-bin"
    finally:
        ledger.close()


@pytest.mark.slow
def test_a_daemon_advances_the_campaign_and_status_shows_it(make_realm):
    realm = make_realm(campaign={"enabled": True, "stages": [
        {"name": "warm-up", "quests": ["warmup*"], "until": {"steps": 2}},
        {"name": "BIN", "skills": {"BIN": 1.0}, "until": {"skill_level": {"BIN": 1}}}]})
    write_text_quest(realm.inbox / "normal" / "other.jsonl", 40, prefix="other")
    write_text_quest(realm.inbox / "low" / "warmup-a.jsonl", 40, prefix="warm")
    assert cli(realm, "daemon", "--until-idle", timeout=300).returncode == 0
    status = json.loads(cli(realm, "status", "--json").stdout)
    assert status["campaign"]["stage"] == 2 and status["campaign"]["name"] == "BIN"
    assert status["campaign"]["history"][0]["ended_step"] >= 2
    quests = {q["name"]: q["id"] for q in status["quests"]}
    ledger = Ledger(realm.ledger_path)
    try:
        started = [e["data"] for e in ledger.events() if e["kind"] == "quest_started"]
        order = [json.loads(d)["quest_id"] for d in started]
        assert order == [quests["warmup-a.jsonl"], quests["other.jsonl"]]  # the stage's quest first, though low
    finally:
        ledger.close()
    assert "campaign:     stage 2 of 2: BIN" in cli(realm, "status").stdout


def test_a_stage_naming_an_unknown_skill_is_reported(tmp_path):
    realm = init_realm(tmp_path / "realm", overrides=deep_update(FAST_CONFIG, {"campaign": {"enabled": True, "stages": [
        {"name": "ghost", "skills": {"GHOST": 1.0}, "until": {"skill_level": {"PHANTOM": 2}}}]}}))
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    try:
        loop = HeroLoop(realm, config, ledger)
        loop.campaign = Campaign(config.campaign, ledger, "hero", realm.inbox)
        loop.campaign.start(0)
        loop.start(0)
        errors = {(e["source"], e["message"]) for e in ledger.skill_load_errors()}
        assert errors == {("campaign stage 1 (ghost)", "no skill named 'GHOST'"),
                          ("campaign stage 1 (ghost)", "no skill named 'PHANTOM'")}
        assert loop.priorities() == {}  # nothing to generate for a skill nobody has
    finally:
        ledger.close()


@pytest.mark.parametrize("school", ["grpo", "fortune_teller"])
def test_the_stage_school_trains_the_quests_the_stage_generates(make_realm, school):
    realm = make_realm(
        training={"micro_batch_size": 2, "eval_holdout_every": 0},
        idle_generation={"enabled": True, "examples_per_quest": 6},
        # a rule matching the name gives the school's settings (grpo's here: a rule naming school sft may not
        # hold them); the stage, not the rule, picks the school (fortune_teller over the rule's sft)
        schools={"skill-*": {"num_generations": 2, "max_completion_length": 4} if school == "grpo" else
                 {"school": "sft"}},
        campaign={"enabled": True, "stages": [
            {"name": "champion", "school": school, "skills": {"BIN": 1.0}, "until": {"steps": 100}}]})
    config = realm.load_config()
    ledger = Ledger(realm.ledger_path)
    try:
        loop = HeroLoop(realm, config, ledger, idle_check_interval_seconds=0)
        loop.campaign = Campaign(config.campaign, ledger, "hero", realm.inbox)
        loop.campaign.start(0)
        loop.start(0)
        path = loop.when_idle()
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if school == "grpo":  # prompt records the skill's scorer checks
            assert set(records[0]) == {"prompt", "answer", "skill", "level"} and records[0]["skill"] == "BIN"
        else:
            assert set(records[0]) == {"prompt", "completion", "skill", "level"}
        from core.campaigns import stage_school_of
        assert stage_school_of(ledger, path.name) == school and stage_school_of(ledger, "other.jsonl") is None
    finally:
        ledger.close()
    from core.daemon import Daemon

    assert Daemon(realm, config, until_idle=True).run() == 0
    ledger = Ledger(realm.ledger_path)
    try:
        quest = ledger.list_quests()[0]
        assert (quest["name"], quest["state"], quest["school"]) == (path.name, "completed", school)
        assert quest["format"] == ("prompt_only" if school == "grpo" else "prompt_completion")
        assert quest["steps"] == (3 if school == "grpo" else quest["steps"]) and quest["steps"] >= 1  # SFT packs rows
        metrics = ledger.step_metrics()
        if school == "grpo":  # scored by each record's skill (no rewards in the rule)
            assert {"reward", "rewards/skill/mean"} <= set(metrics[1])
    finally:
        ledger.close()
    status = json.loads(cli(realm, "status", "--json").stdout)
    assert status["quests"][0]["school"] == school and status["campaign"]["school"] == school


def test_a_stage_with_skills_needs_a_school_that_can_practise_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"campaign": {"stages": [
        {"name": "a", "school": "dpo", "skills": {"BIN": 1.0}, "until": {"steps": 1}}]}}))
    with pytest.raises(ConfigError, match="cannot practise skills"):
        load_config(path)
