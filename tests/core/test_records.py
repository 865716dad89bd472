"""core.records: the stored per-record verdict and the one reader of a quest's trainable records."""

from __future__ import annotations

import json

import pytest

from core.config import RealmConfig
from core.records import (
    QuestChanged,
    RecordVerdicts,
    VerdictsError,
    held_out_records,
    is_held_out,
    load_verdicts,
    trainable_records,
    verdicts_path_for,
    verify_unchanged,
)
from core.validation import validate_file


def words(example: dict) -> tuple[int, int]:
    n = len(example["text"].split())
    return n, n


def validated(path, lines: list[str], **validation) -> RecordVerdicts:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    config = RealmConfig.model_validate({"validation": {"max_bad_line_ratio": 0.9, **validation},
                                         "training": {"max_length": 8}})
    verdicts = RecordVerdicts()
    validate_file(path, config=config, count_tokens=words, verdicts=verdicts)
    return verdicts


def text(n_words: int, tag: str = "w") -> str:
    return json.dumps({"text": " ".join([tag] * n_words)})


def test_sidecar_round_trip_and_damage_is_refused(tmp_path):
    verdicts = RecordVerdicts(content_hash="ab" * 32, format="text", field_map={"q": "text"}, max_line_bytes=4096,
                              lines=5_000_003)
    for line in range(1, 5_000_004, 3):
        verdicts.keep(line)
    path = tmp_path / "q.jsonl.records"
    verdicts.save(path)
    assert path.stat().st_size < 20_000  # 5 million lines: a compressed bitmap, not a row per record
    loaded = load_verdicts(path)
    assert loaded == verdicts and loaded.kept == 1_666_668 and loaded.last_kept() == 5_000_002
    assert loaded.keeps(4) and not loaded.keeps(5) and not loaded.keeps(10**9)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(VerdictsError, match="damaged"):
        load_verdicts(path)
    with pytest.raises(VerdictsError, match="cannot read"):
        load_verdicts(tmp_path / "missing.records")
    assert verdicts_path_for(tmp_path / "000001-a.jsonl").name == "000001-a.jsonl.records"


def test_training_reads_only_kept_lines_and_never_lines_added_after_validation(tmp_path):
    path = tmp_path / "a.jsonl"
    verdicts = validated(path, [text(3), "{oops", text(20), text(2, "x")], length_policy="drop")
    assert [line for line, _ in trainable_records(path, verdicts)] == [1, 4]
    with open(path, "a", encoding="utf-8") as f:  # a writer that kept the file open appends later
        f.write(text(2, "late") + "\n")
    assert [ex["text"] for _, ex in trainable_records(path, verdicts)] == ["w w w", "x x"]
    with pytest.raises(QuestChanged, match="changed after it was validated"):
        verify_unchanged(path, verdicts)


def test_a_kept_line_that_no_longer_parses_raises_instead_of_training_something_else(tmp_path):
    path = tmp_path / "a.jsonl"
    verdicts = validated(path, [text(3), text(2)])
    path.write_text(text(3) + "\n" + "{changed\n", encoding="utf-8")
    with pytest.raises(QuestChanged, match="line 2 was valid when validated"):
        list(trainable_records(path, verdicts))


def test_held_out_records_index_the_trainable_stream(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [text(20) if i % 4 == 1 else text(2, f"r{i}") for i in range(12)]  # lines 2, 6, 10 too long
    verdicts = validated(path, lines, length_policy="drop")
    kept = [line for line, _ in trainable_records(path, verdicts)]
    assert kept == [1, 3, 4, 5, 7, 8, 9, 11, 12]
    held = [line for line, _ in held_out_records(path, verdicts, every=3)]
    assert held == [kept[i] for i in range(len(kept)) if is_held_out(i, 3)] == [4, 8, 12]
    assert [line for line, _ in held_out_records(path, verdicts, every=3, limit=2)] == [4, 8]
    assert [line for line, _ in held_out_records(path, verdicts, every=1)] == kept
