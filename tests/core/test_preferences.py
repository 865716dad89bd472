"""core.preferences on a real SQLite ledger: ratings, pairs, validation, JSONL export in TRL's formats."""

from __future__ import annotations

import json
import sqlite3

import pytest

from core.ledger import Ledger
from core.preferences import (
    PreferenceError,
    delete_preference,
    export_preferences_jsonl,
    export_ratings_jsonl,
    list_preferences,
    preference_counts,
    record_pair,
    record_rating,
)

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story 🐉"}]


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def test_rating_and_pair_rows_are_stored_and_listed(ledger):
    up = record_rating(ledger, checkpoint="step-00000010", prompt=PROMPT, completion="Once upon", rating=1)
    down = record_rating(ledger, checkpoint="step-00000010", prompt=PROMPT, completion="Bad", rating=-1,
                         source="api")
    pair = record_pair(ledger, checkpoint="step-00000020", prompt=PROMPT, chosen="Good", rejected="Worse")
    rows = list_preferences(ledger)
    assert [r["id"] for r in rows] == [pair, down, up]  # newest first
    assert rows[2]["chosen"] == "Once upon" and rows[2]["rejected"] is None and rows[2]["rating"] == 1
    assert rows[1]["rejected"] == "Bad" and rows[1]["chosen"] is None and rows[1]["source"] == "api"
    assert rows[0]["prompt"] == PROMPT and rows[0]["rating"] is None and rows[0]["kind"] == "pair"
    assert preference_counts(ledger) == {"pair": 1, "rating_up": 1, "rating_down": 1}
    assert [r["id"] for r in list_preferences(ledger, kind="rating")] == [down, up]
    assert [r["id"] for r in list_preferences(ledger, before_id=down)] == [up]


def test_the_table_is_in_the_ledger_file_and_survives_reopen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    record_pair(led, checkpoint="hero", prompt=PROMPT, chosen="a", rejected="b")
    led.close()
    with sqlite3.connect(path) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(preferences)")]
    assert cols == ["id", "time", "kind", "checkpoint", "prompt", "chosen", "rejected", "rating", "source"]
    led = Ledger(path)
    assert list_preferences(led)[0]["chosen"] == "a"
    led.close()


def test_replacing_a_rating_is_one_change(ledger):
    first = record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="x", rating=1)
    second = record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="x", rating=-1, replaces=first)
    assert [r["id"] for r in list_preferences(ledger)] == [second]
    with pytest.raises(PreferenceError, match="no preference with id 999"):
        record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="x", rating=1, replaces=999)
    assert [r["id"] for r in list_preferences(ledger)] == [second]  # the failed replace wrote nothing
    delete_preference(ledger, second)
    assert list_preferences(ledger) == []
    with pytest.raises(PreferenceError):
        delete_preference(ledger, second)


@pytest.mark.parametrize("prompt, message", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], r"prompt\[0\]"),
    ([{"role": "wizard", "content": "hi"}], r"prompt\[0\]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last prompt message"),
])
def test_bad_prompts_are_refused_with_a_clear_error(ledger, prompt, message):
    with pytest.raises(PreferenceError, match=message):
        record_rating(ledger, checkpoint="hero", prompt=prompt, completion="x", rating=1)
    assert list_preferences(ledger) == []


def test_bad_answers_and_ratings_are_refused(ledger):
    with pytest.raises(PreferenceError, match="rating must be"):
        record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="x", rating=0)
    with pytest.raises(PreferenceError, match="rating must be"):
        record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="x", rating=True)
    with pytest.raises(PreferenceError, match="completion"):
        record_rating(ledger, checkpoint="hero", prompt=PROMPT, completion="  ", rating=1)
    with pytest.raises(PreferenceError, match="same text"):
        record_pair(ledger, checkpoint="hero", prompt=PROMPT, chosen="same", rejected="same")
    with pytest.raises(PreferenceError, match="checkpoint"):
        record_pair(ledger, checkpoint="", prompt=PROMPT, chosen="a", rejected="b")
    assert list_preferences(ledger) == []


def test_exports_are_trl_conversational_records(ledger, tmp_path):
    record_pair(ledger, checkpoint="s1", prompt=PROMPT, chosen="Good ✨", rejected="Worse")
    record_rating(ledger, checkpoint="s1", prompt=PROMPT, completion="Nice", rating=1)
    record_rating(ledger, checkpoint="s1", prompt=PROMPT, completion="Nope", rating=-1)
    record_pair(ledger, checkpoint="s2", prompt=PROMPT[1:], chosen="B", rejected="A")

    out = tmp_path / "exports" / "dpo.jsonl"
    assert export_preferences_jsonl(ledger, out) == 2
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0] == {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Good ✨"}],
                        "rejected": [{"role": "assistant", "content": "Worse"}]}
    assert lines[1]["prompt"] == PROMPT[1:] and lines[1]["chosen"][0]["content"] == "B"
    assert not list(out.parent.glob("*.tmp"))

    kto = tmp_path / "kto.jsonl"
    assert export_ratings_jsonl(ledger, kto) == 2
    recs = [json.loads(line) for line in kto.read_text(encoding="utf-8").splitlines()]
    assert [(r["completion"][0]["content"], r["label"]) for r in recs] == [("Nice", True), ("Nope", False)]


def test_export_pages_through_many_rows(ledger, tmp_path):
    for i in range(1203):
        record_pair(ledger, checkpoint="s", prompt=PROMPT, chosen=f"c{i}", rejected=f"r{i}")
    out = tmp_path / "all.jsonl"
    assert export_preferences_jsonl(ledger, out) == 1203
    last = json.loads(out.read_text(encoding="utf-8").splitlines()[-1])
    assert last["chosen"][0]["content"] == "c1202"
