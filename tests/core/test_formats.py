"""core.formats: detection, field_map, normalization, line streaming and iter_valid_records on real files."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from core.config import ValidationConfig
from core.formats import (
    ALL_FORMATS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    UNPAIRED_FORMATS,
    CorruptFileError,
    RecordError,
    apply_field_map,
    detect_format,
    field_map_for,
    iter_valid_records,
    normalize,
    open_text_lines,
    parse_line,
    preference_as_sft,
)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent (fresh clone)")

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}

# record, expected format, expected normalized example
CASES = [
    ({"text": "Once upon a time"}, "text", {"text": "Once upon a time"}),
    ({"messages": [{"role": "system", "content": "Be brief."}, U, A], "id": 7}, "messages",
     {"messages": [{"role": "system", "content": "Be brief."}, U, A]}),
    ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", {"prompt": "2+2=", "completion": "4"}),
    ({"prompt": [U], "completion": [A]}, "prompt_completion", {"messages": [U, A]}),
    ({"prompt": "Q?", "chosen": "good", "rejected": "bad"}, "preference",
     {"prompt": "Q?", "chosen": "good", "rejected": "bad"}),
    ({"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "Go away."}]}, "preference",
     {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "Go away."}]}),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "preference_implicit",
     {"prompt": None, "chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"}),
    ({"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}]}, "preference_implicit",
     {"prompt": None, "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}]}),
    ({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca",
     {"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}),
    ({"instruction": "Say hi", "input": "", "output": "hi", "system": "Be kind."}, "alpaca",
     {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi"},
                   {"role": "assistant", "content": "hi"}]}),
    ({"instruction": "Next?", "output": "3", "history": [["1?", "1"], ["2?", "2"]]}, "alpaca",
     {"messages": [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "1"},
                   {"role": "user", "content": "2?"}, {"role": "assistant", "content": "2"},
                   {"role": "user", "content": "Next?"}, {"role": "assistant", "content": "3"}]}),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello!"}, {"from": "function_call", "value": "f()"},
                        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]},
     "sharegpt",
     {"messages": [{"role": "system", "content": "S"}, U, A, {"role": "assistant", "content": "f()"},
                   {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}]}),
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}],
      "system": "Sys"}, "sharegpt",
     {"messages": [{"role": "system", "content": "Sys"}, U, A]}),
]


@pytest.mark.parametrize(("record", "fmt", "expected"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_detect_and_normalize_each_format(record, fmt, expected):
    assert detect_format(record) == fmt
    assert normalize(record, fmt) == expected
    assert parse_line(json.dumps(record), {}) == (fmt, expected)


def test_format_sets_cover_every_format():
    assert SFT_FORMATS == {"text", "messages", "prompt_completion", "alpaca", "sharegpt"}
    assert PREFERENCE_FORMATS == {"preference", "preference_implicit", "preference_sharegpt"}
    assert UNPAIRED_FORMATS == {"unpaired_preference", "messages_rated"}
    assert set(ALL_FORMATS) == SFT_FORMATS | PREFERENCE_FORMATS | UNPAIRED_FORMATS


def test_content_parts_and_empty_system_messages():
    record = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": [
        {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}, A]}
    assert normalize(record, "messages") == {"messages": [{"role": "user", "content": "Hi there"}, A]}


BAD_RECORDS = [
    ({"messages": [{"role": "bot", "content": "x"}, A]}, "messages", "messages[0].role: 'bot' is not one of "
     "system/user/assistant/tool"),
    ({"messages": [U, {"role": "assistant", "content": 5}]}, "messages",
     "messages[1].content must be a non-empty string, got number"),
    ({"messages": [U]}, "messages", "no assistant message"),
    ({"messages": []}, "messages", "messages must not be empty"),
    ({"messages": "hi"}, "messages", "must be a list of messages, got string"),
    ({"messages": [U, {"content": "x"}]}, "messages", "messages[1]: missing field 'role'"),
    ({"messages": [U, {"role": "assistant"}]}, "messages", "messages[1]: missing field 'content'"),
    ({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages", "tool calls"),
    ({"messages": [U, {"role": "assistant", "content": [{"type": "image"}]}]}, "messages", "only text content"),
    ({"prompt": "x"}, None, "missing field 'completion'"),
    ({"prompt": "x", "chosen": "y"}, None, "missing field 'rejected'"),
    ({"input": "x", "output": "y"}, None, "missing field 'instruction'"),
    ({"question": "x", "answer": "y"}, None, "no known format: found fields ['answer', 'question']"),
    ({}, None, "no known format: found fields []"),
    ({"text": ""}, "text", "text must be a non-empty string"),
    ({"text": "  \n"}, "text", "text must be a non-empty string"),
    ({"text": 3}, "text", "text must be a non-empty string, got number"),
    ({"text": {"a": "b"}}, "text", "got object"),
    ({"text": ["a"]}, "text", "got array"),
    ({"text": True}, "text", "got boolean"),
    ({"text": None}, "text", "got null"),
    ({"prompt": "x", "completion": [A]}, "prompt_completion", "both be strings or both be lists"),
    ({"prompt": [U], "completion": [U]}, "prompt_completion", "completion has no assistant message"),
    ({"prompt": "", "completion": "y"}, "prompt_completion", "prompt must be a non-empty string"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "preference", "identical"),
    ({"prompt": "q", "chosen": [A], "rejected": "b"}, "preference", "both be strings or both be lists"),
    ({"prompt": [U], "chosen": "a", "rejected": "b"}, "preference", "prompt is a array"),
    ({"prompt": 1, "chosen": "a", "rejected": "b"}, "preference", "prompt must be a string or a list"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "preference", "prompt must be a string or a list"),
    ({"chosen": [U], "rejected": [U, A]}, "preference_implicit", "chosen has no assistant message"),
    ({"instruction": "x", "output": "y", "input": 3}, "alpaca", "input must be a string, got number"),
    ({"instruction": "x", "output": ""}, "alpaca", "output must be a non-empty string"),
    ({"instruction": "x", "output": "y", "history": [["a"]]}, "alpaca", "history[0] must be"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "sharegpt", "conversations[0].from: 'narrator'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt", "no assistant"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing field 'value'"),
    ({"conversations": []}, "sharegpt", "must not be empty"),
    ({"conversations": [{"from": 1, "value": "x"}]}, "sharegpt", "conversations[0].from: 1 is not one of"),
]


@pytest.mark.parametrize(("record", "fmt", "reason"), BAD_RECORDS, ids=[r[2][:30] for r in BAD_RECORDS])
def test_bad_records_raise_record_error_with_reason(record, fmt, reason):
    with pytest.raises(RecordError) as exc:
        normalize(record, fmt) if fmt else detect_format(record)
    assert reason in str(exc.value)
    with pytest.raises(RecordError):
        parse_line(json.dumps(record), {})


@pytest.mark.parametrize(("line", "reason"), [
    ('{"text": NaN}', "NaN is not a valid JSON number"),
    ('{"text": "a", "score": -Infinity}', "-Infinity is not a valid JSON number"),
    ('{"text": "a", "score": 1e400}', "out of range"),
    ('{"text": "a"', "invalid JSON: Expecting ',' delimiter"),
    ("[1, 2]", "line must be a JSON object, got array"),
    ('"text"', "got string"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": "\\ud800 lone"}', "unpaired UTF-16 surrogate"),
    ('{"text": "a", "n": ' + "9" * 5000 + "}", "invalid JSON"),
])
def test_parse_line_rejects_invalid_json(line, reason):
    with pytest.raises(RecordError) as exc:
        parse_line(line, {})
    assert reason in str(exc.value)


def test_parse_line_enforces_the_file_format():
    assert parse_line('{"text": "x", "prompt": "p"}', {}, "text") == ("text", {"text": "x"})
    with pytest.raises(RecordError, match="record is format 'preference' but the file's format is "
                                          "'preference_implicit'"):
        parse_line('{"prompt": "p", "chosen": "c", "rejected": "r"}', {}, "preference_implicit")
    with pytest.raises(RecordError, match="record is format 'prompt_completion' but the file's format is 'text'"):
        parse_line('{"prompt": "p", "completion": "c"}', {}, "text")
    assert parse_line('{"text": "\\ud83d\\ude00"}', {}) == ("text", {"text": "\U0001F600"})


def test_field_map_for_merges_matching_globs_and_strips_gz():
    field_map = {"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}, "*.jsonl": {"body": "text"},
                 "other*": {"x": "y"}}
    assert field_map_for("gsm8k_train.jsonl", field_map) == {"question": "prompt", "answer": "completion",
                                                             "body": "text"}
    assert field_map_for("gsm8k_train.jsonl.gz", field_map)["question"] == "prompt"
    assert field_map_for("dir/notes.jsonl", field_map) == {"body": "text"}
    assert field_map_for("notes.txt", field_map) == {}


def test_apply_field_map_renames_swaps_and_refuses_collisions():
    assert apply_field_map({"question": "q", "answer": "a", "id": 1}, {"question": "prompt", "answer": "completion"}) \
        == {"id": 1, "prompt": "q", "completion": "a"}
    assert apply_field_map({"a": 1, "b": 2}, {"a": "b", "b": "a"}) == {"b": 1, "a": 2}
    record = {"text": "t"}
    assert apply_field_map(record, {"missing": "x"}) is record
    with pytest.raises(RecordError, match="already has 'prompt'"):
        apply_field_map({"question": "q", "prompt": "p"}, {"question": "prompt"})


def test_preference_as_sft_sides():
    assert preference_as_sft({"prompt": None, "chosen": "c", "rejected": "r"}) == ({"text": "c"}, {"text": "r"})
    assert preference_as_sft({"prompt": "p", "chosen": "c", "rejected": "r"}) == (
        {"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "r"})
    assert preference_as_sft({"prompt": [U], "chosen": [A], "rejected": [U]}) == (
        {"messages": [U, A]}, {"messages": [U, U]})


# -- streaming ---------------------------------------------------------------------------------------
def test_open_text_lines_bom_crlf_blank_long_and_non_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    data = (b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n\xff\xfe bad\n' + b'{"text": "' + b"y" * 2000 + b'"}\n'
            + '{"text": "é"}\r\n'.encode() + b'{"text": "no newline"}')
    p.write_bytes(data)
    h = hashlib.sha256()
    got = list(open_text_lines(p, max_line_bytes=1024, hasher=h))
    assert got == [
        (1, '{"text": "a"}', None),
        (4, None, "not valid UTF-8: invalid start byte (byte 0xff at byte 1)"),
        (5, None, "line is longer than max_line_bytes (2,012 > 1,024 bytes)"),
        (6, '{"text": "é"}', None),
        (7, '{"text": "no newline"}', None),
    ]
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_open_text_lines_line_length_boundary(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"a" * 1024 + b"\r\n" + b"b" * 1025 + b"\n" + b"c" * 1025)
    got = list(open_text_lines(p, max_line_bytes=1024))
    assert got[0] == (1, "a" * 1024, None)
    assert got[1][0] == 2 and got[1][1] is None and "1,025 > 1,024" in got[1][2]
    assert got[2][0] == 3 and got[2][1] is None


def test_open_text_lines_long_first_line_after_bom_stays_one_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"z" * 1025 + b"\n" + b'{"text": "a"}\n')
    got = list(open_text_lines(p, max_line_bytes=1024))
    assert [(n, t) for n, t, _ in got] == [(1, None), (2, '{"text": "a"}')]


def test_open_text_lines_gzip_by_content_and_corrupt_gzip(tmp_path):
    plain = b'{"text": "a"}\n{"text": "b"}\n'
    p = tmp_path / "x.jsonl.gz"
    p.write_bytes(gzip.compress(plain) + b"\0\0\0")
    h = hashlib.sha256()
    assert [t for _, t, _ in open_text_lines(p, hasher=h)] == ['{"text": "a"}', '{"text": "b"}']
    assert h.hexdigest() == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(gzip.compress(plain * 100)[:-30])
    with pytest.raises(CorruptFileError):
        list(open_text_lines(p))


def test_iter_valid_records_yields_exactly_the_valid_lines_in_order(tmp_path):
    lines = [
        '{"junk": 1}',                                   # 1 bad: no format
        '{"prompt": "1+1=", "completion": "2"}',         # 2 valid: fixes the format
        "",                                              # 3 blank
        '{"text": "other format"}',                      # 4 bad: format mismatch
        '{"prompt": "2+2=", "completion": "4", "x": 1}',  # 5 valid
        "not json",                                      # 6 bad
        '{"prompt": "3+3=", "completion": ""}',          # 7 bad: empty completion
        '{"prompt": "4+4=", "completion": "8"}',         # 8 valid
    ]
    p = tmp_path / "math.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = list(iter_valid_records(p, "math.jsonl", ValidationConfig()))
    assert [n for n, _ in got] == [2, 5, 8]
    assert got[1][1] == {"prompt": "2+2=", "completion": "4"}
    assert list(iter_valid_records(p, "math.jsonl", ValidationConfig())) == got  # deterministic


def test_iter_valid_records_applies_field_map_by_display_name(tmp_path):
    p = tmp_path / "q-000123.jsonl"  # stored under another name than the user's
    p.write_text('{"question": "Why?", "answer": "Because."}\n', encoding="utf-8")
    cfg = ValidationConfig(field_map={"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}})
    assert list(iter_valid_records(p, "gsm8k_small.jsonl", cfg)) == [
        (1, {"prompt": "Why?", "completion": "Because."})]
    assert list(iter_valid_records(p, "other.jsonl", cfg)) == []


@needs_shared
def test_real_gsm8k_maps_to_prompt_completion(tmp_path):
    head = []
    with open(SHARED_DATA / "gsm8k_train.jsonl", encoding="utf-8") as f:
        for _ in range(50):
            head.append(f.readline())
    p = tmp_path / "gsm8k_train.jsonl"
    p.write_text("".join(head), encoding="utf-8")
    cfg = ValidationConfig(field_map={"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}})
    got = list(iter_valid_records(p, p.name, cfg))
    assert [n for n, _ in got] == list(range(1, 51))
    first = json.loads(head[0])
    assert got[0][1] == {"prompt": first["question"], "completion": first["answer"]}


@needs_shared
def test_real_hh_rlhf_is_implicit_preference():
    path = SHARED_DATA / "hh_rlhf_harmless_base_test.jsonl.gz"
    got = list(iter_valid_records(path, path.name, ValidationConfig()))
    assert len(got) == 2312
    line, example = got[0]
    assert line == 1 and example["prompt"] is None
    assert example["chosen"].startswith("\n\nHuman:") and example["chosen"] != example["rejected"]


def test_field_map_ignores_the_priority_prefix():
    from core.formats import field_map_for

    fm = {"gsm8k*.jsonl": {"question": "prompt"}}
    assert field_map_for("high_gsm8k_train.jsonl", fm) == {"question": "prompt"}
    assert field_map_for("low_gsm8k.jsonl.gz", fm) == {"question": "prompt"}
    assert field_map_for("other.jsonl", fm) == {}
