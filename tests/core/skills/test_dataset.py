"""Dataset skills: field_map, levels by a key, bad lines counted, held-out records, verifiers (and GSM8K)."""

import gzip
import json

import pytest

from core.config import DatasetSkillConfig
from core.skills.base import TRAIN, TRIAL, SkillError, generate_items, prompt_held_out
from core.skills.dataset import DatasetSkill
from tests.conftest import SHARED_DATA, needs_shared


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_levels_by_key_field_map_and_skipped_lines(tmp_path):
    records = [{"q": f"what is {i} + {i}?", "a": f"#### {2 * i}", "difficulty": i % 3} for i in range(300)]
    write_jsonl(tmp_path / "math.jsonl", records, ['{"q": "no answer"}', "not json", '{"q": "x", "a": "#### 1", '
                                                          '"difficulty": "hard"}', '{"q": "y", "a": "none", "difficulty": 0}'])
    skill = DatasetSkill("MATH", DatasetSkillConfig(path="math.jsonl", field_map={"q": "prompt", "a": "completion"},
                                                    verifier="numeric_answer", level_key="difficulty"), tmp_path)
    assert skill.max_level == 2 and skill.skipped_count == 4
    assert any("difficulty must be an integer" in s for s in skill.skipped)
    assert any("no number" in s for s in skill.skipped)
    levels = skill.levels()
    assert sum(v[TRAIN] + v[TRIAL] for v in levels.values()) == 300
    assert all(v[TRIAL] > 0 for v in levels.values())
    for it in generate_items(skill, 1, 100, 7, TRIAL):
        assert it.level == 1 and prompt_held_out("MATH", it.prompt, 10)
        i = int(it.prompt.split()[2])
        assert i % 3 == 1 and it.answer == f"#### {2 * i}"
    train = {it.prompt for it in generate_items(skill, 1, 300, 7, TRAIN)}
    assert not any(prompt_held_out("MATH", p, 10) for p in train)
    item = generate_items(skill, 0, 1, 3, TRIAL)[0]
    assert skill.score("the sum is " + item.answer.split()[-1], item.answer) == 1.0
    assert skill.score("the sum is -1", item.answer) == 0.0


def test_the_held_out_split_ignores_file_order_and_reads_gzip(tmp_path):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(200)]
    a = DatasetSkill("D", DatasetSkillConfig(path=str(write_jsonl(tmp_path / "a.jsonl", records))), tmp_path)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in reversed(records))
    b = DatasetSkill("D", DatasetSkillConfig(path="b.jsonl.gz"), tmp_path)
    assert {it.prompt for it in a._items[0][TRIAL]} == {it.prompt for it in b._items[0][TRIAL]}
    assert a.max_level == 0
    assert a.score("  c5 ", "c5") == 1.0 and a.score("c55", "c5") == 0.0  # exact_match, whitespace normalised


def test_json_csv_tsv_and_parquet_files_give_the_same_skill(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"q": f"what is {i} + 1?", "a": f"#### {i + 1}", "level": i % 2} for i in range(120)]
    write_jsonl(tmp_path / "s.jsonl", records)
    (tmp_path / "s.json").write_text(json.dumps(records), encoding="utf-8")
    for name, delimiter in (("s.csv", ","), ("s.tsv", "\t")):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["q", "a", "level"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "s.parquet")

    def items(name):
        skill = DatasetSkill("S", DatasetSkillConfig(path=name, field_map={"q": "prompt", "a": "completion"},
                                                     verifier="numeric_answer", level_key="level"), tmp_path)
        assert skill.skipped_count == 0, skill.skipped
        return {(lv, split, it.prompt, it.answer) for lv, splits in skill._items.items()
                for split, its in splits.items() for it in its}

    want = items("s.jsonl")
    assert len(want) == 120 and {lv for lv, *_ in want} == {0, 1}
    for name in ("s.json", "s.csv", "s.tsv", "s.parquet"):
        assert items(name) == want, name
    (tmp_path / "s.txt").write_text("what is 1 + 1?\n\n#### 2\n")
    with pytest.raises(SkillError, match="needs prompt/completion records"):
        DatasetSkill("S", DatasetSkillConfig(path="s.txt"), tmp_path)


def test_unreadable_or_empty_files_raise(tmp_path):
    with pytest.raises(SkillError, match="cannot read"):
        DatasetSkill("D", DatasetSkillConfig(path="missing.jsonl"), tmp_path)
    write_jsonl(tmp_path / "empty.jsonl", [{"text": "no prompt"}])
    with pytest.raises(SkillError, match="no usable record"):
        DatasetSkill("D", DatasetSkillConfig(path="empty.jsonl"), tmp_path)


def test_a_level_without_trial_records_raises(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", [{"prompt": "only", "completion": "one"}])
    skill = DatasetSkill("D", DatasetSkillConfig(path="one.jsonl", holdout_every=1000), tmp_path)
    split = TRIAL if prompt_held_out("D", "only", 1000) else TRAIN
    other = TRAIN if split == TRIAL else TRIAL
    with pytest.raises(SkillError, match=f"no {other} record"):
        generate_items(skill, 0, 1, 0, other)


@needs_shared(SHARED_DATA / "gsm8k_train.jsonl")
def test_gsm8k_as_a_skill():
    skill = DatasetSkill("GSM8K", DatasetSkillConfig(path=str(SHARED_DATA / "gsm8k_train.jsonl"),
                                                     field_map={"question": "prompt", "answer": "completion"},
                                                     verifier="numeric_answer"), "/")
    counts = skill.levels()[0]
    assert skill.skipped_count == 0 and counts[TRAIN] + counts[TRIAL] == 7473
    assert 0.08 < counts[TRIAL] / 7473 < 0.12
    item = generate_items(skill, 0, 1, 1, TRIAL)[0]
    assert "####" in item.answer and skill.score(item.answer, item.answer) == 1.0
    final = item.answer.rsplit("####", 1)[1].strip()
    assert skill.score(f"I think the answer is {final}.", item.answer) == 1.0
    assert skill.score("I think the answer is 123456789.", item.answer) == 0.0
