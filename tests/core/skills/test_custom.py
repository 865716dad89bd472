"""Custom skills from the realm's skills/ folder, and the registry that never dies of a broken one."""

import json

import pytest

from core.config import SkillsConfig
from core.ledger import Ledger
from core.skills.base import SkillError, generate_items
from core.skills.registry import build_registry, report_errors

ECHO = '''
from __future__ import annotations

import random
from dataclasses import dataclass

NAME = "ECHO"
DESCRIPTION = "repeat a word"
MAX_LEVEL = 2

@dataclass
class Word:
    text: str


def generate(level, rng):
    word = Word("".join(rng.choice("abc") for _ in range(level + 2))).text
    return f"echo {word}", word

def score(completion, answer):
    return completion.strip() == answer

def space_size(level):
    return 3 ** (level + 2)
'''


def skills_dir(tmp_path, **files):
    folder = tmp_path / "skills"
    folder.mkdir(exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(body, encoding="utf-8")
    return tmp_path


def test_a_custom_skill_works_like_a_builtin(tmp_path):
    registry = build_registry(skills_dir(tmp_path, **{"echo.py": ECHO}), SkillsConfig(priorities={"ECHO": 2.0}))
    assert registry.errors == [] and registry.priorities == {"ECHO": 2.0}
    echo = registry.get("ECHO")
    assert echo.max_level == 2 and echo.description == "repeat a word" and echo.space_size(1) == 27
    items = generate_items(echo, 2, 20, 5)
    assert items == generate_items(echo, 2, 20, 5)
    assert all(it.prompt == f"echo {it.answer}" and len(it.answer) == 4 for it in items)
    assert echo.score(" abca ", "abca") == 1.0 and echo.score("abc", "abca") == 0.0
    assert {"BIN", "LETTERS", "ECHO"} <= set(registry.skills)


BROKEN = {
    "syntax.py": ("def generate(level, rng)\n    return 'a', 'b'\n", "SyntaxError"),
    "raises.py": ("raise RuntimeError('cannot start')\n", "RuntimeError: cannot start"),
    "exits.py": ("import sys\nsys.exit(2)\n", "SystemExit"),
    "nogen.py": ("NAME = 'NOGEN'\n", "defines no function generate"),
    "types.py": ("def generate(level, rng):\n    return 42\n", "must return (prompt, answer) strings"),
    "genfails.py": ("def generate(level, rng):\n    return 1 / 0\n", "ZeroDivisionError"),
    "badname.py": ("NAME = '9 lives'\ndef generate(level, rng):\n    return 'a', 'b'\n", "NAME '9 lives'"),
    "badlevel.py": ("MAX_LEVEL = -3\ndef generate(level, rng):\n    return 'a', 'b'\n", "MAX_LEVEL"),
    "taken.py": ("NAME = 'BIN'\ndef generate(level, rng):\n    return 'a', 'b'\n", "already taken"),
}


def test_broken_files_are_reported_and_the_rest_loads(tmp_path):
    files = {name: body for name, (body, _) in BROKEN.items()}
    root = skills_dir(tmp_path, **files, **{"echo.py": ECHO, "_helper.py": "raise SystemExit(1)\n",
                                            "notes.txt": "not python"})
    registry = build_registry(root, SkillsConfig(priorities={"BIN": 1.0, "GHOST": 1.0, "ECHO": 0.0}))
    assert set(registry.skills) == {"BIN", "LETTERS", "ECHO"}
    by_source = {e.source: e.message for e in registry.errors}
    for name, (_, needle) in BROKEN.items():
        assert needle in by_source[f"skills/{name}"], (name, by_source.get(f"skills/{name}"))
    assert "no skill named 'GHOST'" in by_source["skills.priorities"]
    assert "skills/_helper.py" not in by_source
    assert registry.priorities == {"BIN": 1.0}  # zero weights and unknown names left out
    with pytest.raises(SkillError, match="ZeroDivisionError"):
        registry.get("GENFAILS")


def test_errors_raised_later_are_skill_errors(tmp_path):
    body = ("def generate(level, rng):\n    if level == 1:\n        raise ValueError('no level 1 today')\n"
            "    return 'p', 'a'\nMAX_LEVEL = 1\n"
            "def score(completion, answer):\n    if completion == 'boom':\n        raise KeyError(completion)\n"
            "    return 7\n")
    registry = build_registry(skills_dir(tmp_path, **{"flaky.py": body}), SkillsConfig())
    flaky = registry.get("FLAKY")
    with pytest.raises(SkillError, match="no level 1 today"):
        generate_items(flaky, 1, 1, 0)
    with pytest.raises(SkillError, match="score raised KeyError"):
        flaky.score("boom", "a")
    with pytest.raises(SkillError, match="number in \\[0, 1\\]"):
        flaky.score("x", "a")


def test_dataset_problems_are_reported_not_fatal(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"oops": 1}\n')
    config = SkillsConfig(datasets={"GONE": {"path": "nowhere.jsonl"}, "D": {"path": "d.jsonl"}})
    registry = build_registry(tmp_path, config)
    assert "D" in registry and "GONE" not in registry
    messages = {e.source: e.message for e in registry.errors}
    assert "cannot read" in messages["skills.datasets.GONE"]
    assert "1 record(s) skipped" in messages["skills.datasets.D"]


def test_load_errors_go_to_the_ledger_once(tmp_path):
    root = skills_dir(tmp_path, **{"syntax.py": BROKEN["syntax.py"][0]})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        for _ in range(3):
            report_errors(ledger, build_registry(root, SkillsConfig()))
        stored = ledger.skill_load_errors()
        assert [e["source"] for e in stored] == ["skills/syntax.py"]
        events = [e for e in ledger.events() if e["kind"] == "skill_error"]
        assert len(events) == 1 and events[0]["level"] == "warning" and "SyntaxError" in events[0]["message"]
        assert json.loads(events[0]["data"])["source"] == "skills/syntax.py"
        (root / "skills" / "syntax.py").unlink()
        report_errors(ledger, build_registry(root, SkillsConfig()))
        assert ledger.skill_load_errors() == []
    finally:
        ledger.close()
