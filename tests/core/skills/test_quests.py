"""Skill items as quest records: accepted by validation, trained on the answer only, and a trial's prompt
is exactly the text before the answer in training."""

import json
import tempfile
from pathlib import Path

import pytest

from core.chat import count_tokens, tokenize_example, trainable_segments
from core.config import RealmConfig
from core.formats import iter_valid_records
from core.hero import build_byte_tokenizer, load_tokenizer
from core.skills.binary import BinarySkill
from core.skills.letters import LettersSkill
from core.skills.quests import quest_file_name, quest_record, training_items, write_quest
from core.skills.trials import end_of_turn_marker, generation_prompt
from core.validation import validate_file
from tests.conftest import STORIES260K, needs_shared


def test_a_skill_quest_validates_as_prompt_completion(tmp_path):
    items = training_items(BinarySkill(), 3, 200, "k") + training_items(LettersSkill(), 9, 50, "k")
    path = write_quest(tmp_path / quest_file_name("BIN", 3, "k"), (quest_record(it) for it in items))
    assert path.name == "skill-BIN-L3-k.jsonl"
    tok = build_byte_tokenizer()
    report = validate_file(path, config=RealmConfig(), count_tokens=lambda ex: count_tokens(ex, tok))
    assert report.accepted and report.format == "prompt_completion" and report.trainable
    assert report.records_valid == report.examples == 250 and report.records_bad == 0
    assert report.tokens.max < 60 and report.trainable_token_ratio > 0.1  # short items, loss on the answers
    first = json.loads(path.read_text().splitlines()[0])
    assert first["skill"] == "BIN" and first["level"] == 3
    assert first["prompt"] == [{"role": "user", "content": items[0].prompt}]
    assert first["completion"] == [{"role": "assistant", "content": items[0].answer}]


def _check_alignment(tokenizer, items):
    marker = end_of_turn_marker(tokenizer)
    for item in items:
        (_, example), = iter_valid_records_from([quest_record(item)])
        te = tokenize_example(example, tokenizer, None)
        prompt_ids = tokenizer(generation_prompt(tokenizer, item), add_special_tokens=False)["input_ids"]
        assert te.input_ids[:len(prompt_ids)] == prompt_ids  # the trial's prompt is the training prefix
        assert all(label == -100 for label in te.labels[:len(prompt_ids)])  # no loss on the prompt
        segments = trainable_segments(te, tokenizer)
        assert len(segments) == 1 and segments[0].strip() == item.answer + marker


def iter_valid_records_from(records):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "q.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return list(iter_valid_records(path, path.name, RealmConfig().validation))


def test_prompt_and_loss_alignment_with_the_default_heros_tokenizer():
    tok = build_byte_tokenizer()
    assert end_of_turn_marker(tok) == "<|im_end|>"
    _check_alignment(tok, training_items(BinarySkill(), 2, 20, 1) + training_items(LettersSkill(), 8, 10, 1))
    item = training_items(BinarySkill(), 0, 1, 0)[0]
    assert generation_prompt(tok, item) == f"<|im_start|>user\n{item.prompt}<|im_end|>\n<|im_start|>assistant\n"


@needs_shared(STORIES260K)
def test_prompt_and_loss_alignment_with_stories260k():
    tok = load_tokenizer(STORIES260K, RealmConfig().hero)
    _check_alignment(tok, training_items(BinarySkill(), 5, 20, 1) + training_items(LettersSkill(), 3, 10, 1))


def test_write_quest_is_atomic_and_never_overwrites(tmp_path):
    path = write_quest(tmp_path / "q.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(FileExistsError):
        write_quest(path, [{"prompt": "c", "completion": "d"}])
    assert json.loads(path.read_text()) == {"prompt": "a", "completion": "b"}

    def failing():
        yield {"prompt": "a", "completion": "b"}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_quest(tmp_path / "r.jsonl", failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]  # no half file, no .part left


def test_training_items_are_reproducible_per_key():
    skill = BinarySkill()
    assert training_items(skill, 5, 30, "quest-7") == training_items(skill, 5, 30, "quest-7")
    assert training_items(skill, 5, 30, "quest-7") != training_items(skill, 5, 30, "quest-8")


def test_mixed_items_interleave_levels_reproducibly():
    from core.skills.quests import mixed_items

    items = mixed_items(BinarySkill(), [0, 1, 2], 301, "k")
    assert [sum(it.level == lv for it in items) for lv in (0, 1, 2)] == [101, 100, 100]
    assert mixed_items(BinarySkill(), [0, 1, 2], 301, "k") == items
    first_third = items[:100]
    assert {it.level for it in first_third} == {0, 1, 2}  # not blocks of one level
    with pytest.raises(ValueError):
        mixed_items(BinarySkill(), [], 10, "k")
