"""``trial``, ``spar``, ``skills list|quest`` and ``status --json`` skills, in-process on a nano realm."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli
from training.cli import ExitCode, main


def run(capsys, realm, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--realm", str(realm.root), *args], {})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_skills_quest_writes_an_inbox_quest_mixing_levels(capsys, make_realm):
    realm = make_realm()
    code, out, _ = run(capsys, realm, "skills", "quest", "BIN", "--level", "0", "--level", "3", "--count", "101",
                       "--key", "k1")
    assert code == ExitCode.OK
    path = realm.inbox / "normal" / "skill-BIN-L0-3-k1.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 101 and {r["level"] for r in records} == {0, 3} and f"-> {path}" in out
    assert sum(r["level"] == 0 for r in records) == 51
    # the same key gives the same quest; an existing file is never overwritten
    code, _, _ = run(capsys, realm, "skills", "quest", "BIN", "--level", "0", "--level", "3", "--count", "101",
                     "--key", "k1", "--out", str(realm.root / "again.jsonl"))
    assert code == ExitCode.OK and (realm.root / "again.jsonl").read_text() == path.read_text()
    assert run(capsys, realm, "skills", "quest", "NOPE")[0] == ExitCode.NOT_FOUND
    assert run(capsys, realm, "skills", "quest", "BIN", "--level", "12")[0] == ExitCode.USAGE
    assert run(capsys, realm, "skills", "quest", "BIN", "--count", "0")[0] == ExitCode.USAGE


def test_trial_on_the_base_hero_is_stored_and_shown_in_status(capsys, make_realm):
    realm = make_realm()
    code, out, _ = run(capsys, realm, "trial", "BIN", "--checkpoint", "base", "--json")
    assert code == ExitCode.OK
    trial = json.loads(out)
    assert trial["skill"] == "BIN" and trial["level"] == 0 and trial["n"] == 50 and trial["global_step"] == 0
    assert trial["checkpoint"] == "base" and len(trial["samples"]) == 6 and trial["threshold"] == 0.8
    assert trial["promoted"] is (trial["lower_bound"] >= 0.8) and 0 <= trial["correct"] <= 50
    # a second trial of the same checkpoint draws fresh items
    code, out, _ = run(capsys, realm, "trial", "BIN", "--checkpoint", "base", "--json", "--samples", "30")
    assert code == ExitCode.OK and json.loads(out)["seed"] != trial["seed"] and json.loads(out)["n"] == 30
    code, out, _ = run(capsys, realm, "status", "--json")
    skills = json.loads(out)["skills"]
    assert skills == [{"name": "BIN", "level": 0, "trials": 2, "priority": 1.0,
                       "last_trial": {"level": 0, "n": 30, "correct": json.loads(out)["skills"][0]["last_trial"]["correct"],
                                      "accuracy": skills[0]["last_trial"]["accuracy"],
                                      "lower_bound": skills[0]["last_trial"]["lower_bound"], "step": 0}}]
    code, out, _ = run(capsys, realm, "status")
    assert "BIN level 0 (2 trials; last trial level 0:" in out


def test_trial_refusals(capsys, make_realm):
    realm = make_realm()
    assert run(capsys, realm, "trial", "BIN")[0] == ExitCode.NOT_FOUND  # no checkpoint yet
    code, _, err = run(capsys, realm, "trial", "GHOST", "--checkpoint", "base")
    assert code == ExitCode.NOT_FOUND and "no skill named 'GHOST'" in err and "BIN" in err
    assert run(capsys, realm, "trial", "BIN", "--checkpoint", "base", "--samples", "29")[0] == ExitCode.USAGE
    assert run(capsys, realm, "trial", "BIN", "--checkpoint", "base", "--level", "99")[0] == ExitCode.USAGE
    assert run(capsys, realm, "trial", "BIN", "--checkpoint", "step-00000007")[0] == ExitCode.NOT_FOUND


def test_a_broken_custom_skill_is_reported_not_fatal(capsys, make_realm):
    realm = make_realm(skills={"priorities": {"BIN": 1.0, "ECHO": 1.0}})
    (realm.root / "skills").mkdir()
    (realm.root / "skills" / "echo.py").write_text("def generate(level, rng)\n")
    code, out, err = run(capsys, realm, "skills", "list", "--json")
    assert code == ExitCode.OK and "skills/echo.py" in err
    listed = json.loads(out)
    assert [s["name"] for s in listed["skills"]] == ["BIN", "LETTERS"]
    assert {e["source"] for e in listed["errors"]} == {"skills/echo.py", "skills.priorities"}
    status = json.loads(run(capsys, realm, "status", "--json")[1])
    assert any("SyntaxError" in e["message"] for e in status["skill_errors"])
    assert [s["name"] for s in status["skills"]] == ["BIN", "ECHO"] and status["skills"][1]["level"] == 0


def test_invalid_skills_config_exits_3(make_realm):
    realm = make_realm()
    (realm.root / "config.json").write_text(json.dumps({"skills": {"trial_samples": 10, "promotion_threshold": 1.5}}))
    result = cli(realm, "status")
    assert result.returncode == ExitCode.CONFIG
    assert "skills.trial_samples" in result.stderr and "skills.promotion_threshold" in result.stderr


def test_spar_queues_the_corrections_of_the_wrong_answers(capsys, make_realm):
    realm = make_realm()
    code, out, _ = run(capsys, realm, "spar", "BIN", "--checkpoint", "base", "--count", "30", "--json")
    assert code == ExitCode.OK
    spar = json.loads(out)
    assert spar["skill"] == "BIN" and spar["level"] == 0 and spar["n"] == 30 and spar["round"] == 1
    assert spar["wrong"] == 30 - spar["correct"] > 0  # the newborn hero knows no BIN yet
    path = realm.inbox / "high" / "spar-BIN-L0-r000001-s0.jsonl"
    assert spar["path"] == str(path) and spar["quest"] == path.name
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == spar["examples"] == spar["wrong"]
    assert all(r["completion"][0]["content"] == str(int(r["prompt"][0]["content"][0], 2)
                                                     + int(r["prompt"][0]["content"][2], 2))
               .replace("2", "10") for r in records)  # the right answers of level 0
    code, out, _ = run(capsys, realm, "spar", "BIN", "--checkpoint", "base", "--count", "5", "--feedback-turn")
    assert code == ExitCode.OK and "sparring round #2 on base" in out and "correction example(s) ->" in out
    second = realm.inbox / "high" / "spar-BIN-L0-r000002-s0.jsonl"
    assert all(len(json.loads(line)["prompt"]) == 3 for line in second.read_text().splitlines())
    status = json.loads(run(capsys, realm, "status", "--json")[1])
    assert status["skills"][0]["trials"] == 0  # a sparring round is not a trial


def test_spar_refusals(capsys, make_realm):
    realm = make_realm()
    assert run(capsys, realm, "spar", "BIN")[0] == ExitCode.NOT_FOUND  # no checkpoint yet
    code, _, err = run(capsys, realm, "spar", "GHOST", "--checkpoint", "base")
    assert code == ExitCode.NOT_FOUND and "no skill named 'GHOST'" in err
    assert run(capsys, realm, "spar", "BIN", "--checkpoint", "base", "--count", "0")[0] == ExitCode.USAGE
    assert run(capsys, realm, "spar", "BIN", "--checkpoint", "base", "--level", "12")[0] == ExitCode.USAGE
    assert not any(realm.inbox.rglob("*.jsonl"))


@pytest.mark.slow
def test_a_correction_quest_is_queued_at_high_priority_and_trained(capsys, make_realm):
    realm = make_realm()
    code, out, _ = run(capsys, realm, "spar", "BIN", "--checkpoint", "base", "--count", "30", "--json")
    assert code == ExitCode.OK
    spar = json.loads(out)
    assert cli(realm, "daemon", "--until-idle", timeout=300).returncode == ExitCode.OK
    (quest,) = json.loads(cli(realm, "status", "--json").stdout)["quests"]
    assert quest["name"] == spar["quest"] and quest["priority"] == "high" and quest["state"] == "completed"
    assert quest["examples_trained"] == spar["examples"]
