"""core.validation: streaming validation reports on real files (plain, gzip, malformed, real data)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import core.validation as validation
from core.config import RealmConfig
from core.formats import CorruptFileError, iter_valid_records, preference_as_sft
from core.validation import (
    ValidationReport,
    format_report_text,
    length_action,
    validate_file,
    write_report,
)

SHARED = Path(__file__).resolve().parents[3] / "shared"
needs_shared_data = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is absent")
needs_stories = pytest.mark.skipif(not (SHARED / "models" / "stories260K").is_dir(),
                                   reason="../shared/models/stories260K is absent")


def config(**validation_values) -> RealmConfig:
    max_length = validation_values.pop("max_length", 512)
    return RealmConfig.model_validate({"validation": validation_values, "training": {"max_length": max_length}})


def words(example: dict) -> tuple[int, int]:
    """Whitespace tokens: (all words, words of the completion / assistant messages / text)."""
    if "text" in example:
        n = len(example["text"].split())
        return n, n
    if "prompt" in example:
        p, c = len(example["prompt"].split()), len(example["completion"].split())
        return p + c, c
    total = trainable = 0
    for m in example["messages"]:
        n = len(m["content"].split())
        total += n
        trainable += n if m["role"] == "assistant" else 0
    return total, trainable


def measure(example: dict) -> tuple[int, ...]:
    """Word counts of an example's SFT shapes: itself, or both sides of a preference pair."""
    return tuple(words(side)[0] for side in (preference_as_sft(example) if "chosen" in example else (example,)))


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


def text_line(n_words: int) -> str:
    return json.dumps({"text": " ".join(["w"] * n_words)})


def test_accepted_file_report(tmp_path):
    p = write_lines(tmp_path / "stories.jsonl", [text_line(3), text_line(5), "", text_line(7)])
    report = validate_file(p, config=config(), count_tokens=words)
    assert report.accepted and report.reason is None
    assert report.file == "stories.jsonl" and report.format == "text" and report.trainable
    assert (report.lines, report.records_valid, report.records_bad, report.examples) == (3, 3, 0, 3)
    assert report.size_bytes == p.stat().st_size
    assert report.content_hash == hashlib.sha256(p.read_bytes()).hexdigest()
    assert report.tokens.model_dump() == {"total": 15, "trainable": 15, "cut": 0, "trainable_cut": 0, "min": 3,
                                          "p50": 5, "p95": 7, "p99": 7, "max": 7}
    assert report.trainable_token_ratio == 1.0 and report.note is None
    assert report.max_length == 512 and report.length_policy == "truncate"


def test_without_count_tokens_no_token_stats(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(3)])
    report = validate_file(p, config=config())
    assert report.accepted and report.tokens is None and report.trainable_token_ratio is None


def test_percentiles_are_exact_nearest_rank(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(n) for n in range(1, 201)])
    t = validate_file(p, config=config(), count_tokens=words).tokens
    assert (t.min, t.p50, t.p95, t.p99, t.max, t.total) == (1, 100, 190, 198, 200, sum(range(1, 201)))


def test_bad_lines_listed_with_numbers_and_reasons(tmp_path):
    lines = [text_line(2)] * 20
    lines[2] = '{"text": 5}'
    lines[6] = "{broken"
    lines[9] = '{"prompt": "a", "completion": "b"}'
    p = write_lines(tmp_path / "a.jsonl", lines)
    report = validate_file(p, config=config(max_bad_line_ratio=0.2), count_tokens=words)
    assert report.accepted  # 3 of 20 = 15% <= 20%: bad lines skipped and listed
    assert [b.line for b in report.bad_lines] == [3, 7, 10]
    reasons = [b.reason for b in report.bad_lines]
    assert reasons[0] == "text must be a non-empty string, got number"
    assert reasons[1].startswith("invalid JSON: Expecting property name enclosed in double quotes")
    assert "file's format is 'text'" in reasons[2]
    assert report.records_valid == 17 and report.records_bad == 3 and report.bad_line_ratio == 0.15


@pytest.mark.parametrize(("max_ratio", "accepted"), [(0.15, True), (0.1499, False), (0.0, False)])
def test_bad_line_ratio_threshold(tmp_path, max_ratio, accepted):
    lines = [text_line(2)] * 17 + ["nope", "[]", '{"x": 1}']
    p = write_lines(tmp_path / "a.jsonl", lines)
    report = validate_file(p, config=config(max_bad_line_ratio=max_ratio))
    assert report.accepted is accepted
    if not accepted:
        assert "3 of 20 lines are bad (15.00% > validation.max_bad_line_ratio" in report.reason
        assert "line 18: invalid JSON" in report.reason and "line 19: line must be a JSON object" in report.reason


def test_all_bad_or_empty_files_are_rejected(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert validate_file(empty, config=config()).reason == "empty file: no non-blank lines"
    blank = write_lines(tmp_path / "blank.jsonl", ["", "   ", "\t"])
    assert validate_file(blank, config=config()).reason == "empty file: no non-blank lines"
    bad = write_lines(tmp_path / "bad.jsonl", ["1", "2"])
    report = validate_file(bad, config=config(max_bad_line_ratio=1.0))
    assert not report.accepted and report.reason.startswith("no valid records (2 bad lines): line 1:")


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("data.jsonl", b'[{"text": "a"},\n{"text": "b"}]\n', "name it 'data.json' to read it as an array"),
    ("data.json", b'{"data": [\n{"text": "a"}]}\n', "a JSON object, not an array of records"),
    ("data.json", b'\x00\x01garbage', "not JSON"),
    ("data.json.gz", gzip.compress(b'[{"text": "a"},'), "invalid or truncated JSON at record 2"),
    ("data.json", b'[{"text": "a"}, {"text": "b"', "invalid or truncated JSON at record 2"),
    ("notes.txt", b"\x00\x01\x02binary\xff\xfe", "binary data (NUL bytes)"),
    ("table.csv", b"a,b\n", "empty file: no records"),
    ("README", b"hello\n", "unsupported file type '(none)'"),
    ("x.parquet", b"PAR1\x00\x00", "damaged Parquet file"),
    ("x.parquet", b"not parquet at all", "not a Parquet file"),
    ("x.parquet.gz", gzip.compress(b"PAR1"), "gzip-compressed Parquet"),
    ("data.jsonl.gz", b'{"text": "a"}\n', "named .gz but is not gzip-compressed"),
    ("data.csv", gzip.compress(b'text\na\n'), "rename it to .csv.gz"),
    ("data.jsonl", gzip.compress(b'{"text": "a"}\n'), "rename it to .jsonl.gz"),
    ("data.jsonl", '{"text": "a"}\n'.encode("utf-16"), "UTF-16"),
    ("data.jsonl", '{"text": "a"}\n'.encode("utf-16-le"), "UTF-16"),
    ("data.jsonl.gz", b"\x1f\x8b garbage", "gzip"),
])
def test_file_level_rejections(tmp_path, name, content, needle):
    p = tmp_path / "stored.bin"
    p.write_bytes(content)
    report = validate_file(p, display_name=name, config=config())
    assert not report.accepted and needle in report.reason
    assert report.file == name and report.content_hash == hashlib.sha256(content).hexdigest()
    assert needle in format_report_text(report)


def test_real_alpaca_json_array_is_validated_as_alpaca():
    path = SHARED / "data" / "llamafactory_alpaca_en_demo.json"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    report = validate_file(path, config=config(), count_tokens=words)
    assert report.accepted, report.reason
    assert (report.container, report.format, report.records_valid, report.records_bad) == ("json", "alpaca", 999, 0)
    assert report.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "container json" in format_report_text(report) and "positions in the JSON array" in report.record_numbers


def test_gzip_accepted_and_hash_of_compressed_bytes(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(("\n".join([text_line(4)] * 10) + "\n").encode()))
    report = validate_file(p, config=config(), count_tokens=words)
    assert report.accepted and report.records_valid == 10 and report.tokens.total == 40
    assert report.content_hash == hashlib.sha256(p.read_bytes()).hexdigest()


def test_truncated_gzip_is_rejected(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(("\n".join([text_line(50)] * 2000)).encode())[:-40])
    report = validate_file(p, config=config())
    assert not report.accepted and report.reason.startswith("broken gzip stream")
    assert report.content_hash == hashlib.sha256(p.read_bytes()).hexdigest()


def test_bom_and_crlf(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join([text_line(2).encode()] * 3) + b"\r\n")
    report = validate_file(p, config=config())
    assert report.accepted and report.records_valid == 3 and report.records_bad == 0
    assert [n for n, _ in iter_valid_records(p, p.name, config().validation)] == [1, 2, 3]


def test_non_utf8_binary_and_long_lines_are_bad_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    good = text_line(2).encode()
    p.write_bytes(b"\n".join([good, b"\xc3\x28 latin", b"\x00\x01\x02\xff", b'{"text": "' + b"x" * 5000 + b'"}',
                              good]) + b"\n")
    report = validate_file(p, config=config(max_line_bytes=1024, max_bad_line_ratio=1.0))
    assert report.accepted and report.records_valid == 2
    by_line = {b.line: b.reason for b in report.bad_lines}
    assert by_line[2].startswith("not valid UTF-8") and by_line[3].startswith("not valid UTF-8")
    assert by_line[4] == "line is longer than max_line_bytes (5,012 > 1,024 bytes)"


@pytest.mark.parametrize(("policy", "valid", "bad", "dropped", "truncated", "examples"), [
    ("truncate", 4, 0, 0, 2, 4),
    ("drop", 4, 0, 2, 0, 2),
    ("reject", 2, 2, 0, 0, 2),
])
def test_length_policies(tmp_path, policy, valid, bad, dropped, truncated, examples):
    p = write_lines(tmp_path / "a.jsonl", [text_line(5), text_line(12), text_line(8), text_line(9)])
    report = validate_file(p, config=config(length_policy=policy, max_length=8, max_bad_line_ratio=0.5),
                           count_tokens=words)
    assert report.accepted
    got = (report.records_valid, report.records_bad, report.records_dropped, report.truncated, report.examples)
    assert got == (valid, bad, dropped, truncated, examples)
    if policy == "drop":
        assert [(d.line, d.reason) for d in report.dropped_lines] == [(2, "12 tokens > max_length 8"),
                                                                      (4, "9 tokens > max_length 8")]
        assert report.tokens.max == 8 and report.tokens.total == 13
    if policy == "reject":
        assert [b.line for b in report.bad_lines] == [2, 4] and "length_policy reject" in report.bad_lines[0].reason
    if policy == "truncate":
        assert report.tokens.max == 12  # lengths as measured, before truncation


def test_every_record_dropped_is_rejected(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(20)] * 3)
    report = validate_file(p, config=config(length_policy="drop", max_length=8), count_tokens=words)
    assert not report.accepted and "every valid record is longer than max_length 8" in report.reason


def test_length_action():
    assert length_action(8, 8, "drop") == "keep"
    assert [length_action(9, 8, p) for p in ("truncate", "drop", "reject")] == ["truncate", "drop", "reject"]


def test_count_tokens_failure_is_a_bad_line(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(2), json.dumps({"text": "boom"})])

    def count(example):
        if example["text"] == "boom":
            raise ValueError("template exploded")
        return words(example)

    report = validate_file(p, config=config(max_bad_line_ratio=0.5), count_tokens=count)
    assert report.accepted and report.bad_lines[0].model_dump() == {
        "line": 2, "reason": "could not tokenize: ValueError: template exploded"}


def test_low_trainable_ratio_is_noted(tmp_path):
    line = json.dumps({"prompt": " ".join(["p"] * 999), "completion": "c"})
    p = write_lines(tmp_path / "a.jsonl", [line])
    report = validate_file(p, config=config(max_length=2048), count_tokens=words)
    assert report.accepted and report.trainable_token_ratio == 0.001
    assert "min_trainable_token_ratio" in report.note


def test_preference_accepted_for_the_dpo_school(tmp_path):
    lines = [json.dumps({"prompt": "Q", "chosen": "a b c", "rejected": "d"}) for _ in range(3)]
    p = write_lines(tmp_path / "prefs.jsonl", lines)
    report = validate_file(p, config=config(), count_tokens=words)
    assert report.accepted and report.format == "preference" and report.trainable and report.school == "dpo"
    assert report.note is None and "school dpo" in format_report_text(report)
    assert report.tokens.total == 3 * 4 and report.tokens.max == 4  # the longer side: prompt + chosen


def test_field_map_gsm8k_shape(tmp_path):
    lines = [json.dumps({"question": f"What is {i}+{i}?", "answer": f"#### {2 * i}"}) for i in range(5)]
    p = write_lines(tmp_path / "stored-name.jsonl", lines)
    cfg = config(field_map={"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}})
    report = validate_file(p, display_name="gsm8k_mini.jsonl", config=cfg, count_tokens=words)
    assert report.accepted and report.format == "prompt_completion" and report.records_valid == 5
    assert report.field_map == {"question": "prompt", "answer": "completion"}
    unmapped = validate_file(p, display_name="other.jsonl", config=cfg)
    assert not unmapped.accepted and "no known format: found fields ['answer', 'question']" in unmapped.reason


def test_bad_line_list_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "MAX_LISTED_LINES", 5)
    p = write_lines(tmp_path / "a.jsonl", ["x"] * 12 + [text_line(1)])
    report = validate_file(p, config=config(max_bad_line_ratio=1.0))
    assert report.records_bad == 12 and len(report.bad_lines) == 5 and report.bad_lines_truncated == 7
    assert "and 7 more" in format_report_text(report, max_listed=5)


def test_write_report_atomic_json(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(2), "bad"])
    report = validate_file(p, config=config(max_bad_line_ratio=0.5), count_tokens=words)
    out = tmp_path / "a.jsonl.report.json"
    write_report(report, out)
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data == report.to_dict() and data["bad_lines"] == [{"line": 2, "reason": data["bad_lines"][0]["reason"]}]
    assert ValidationReport.model_validate(data) == report
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.report.json"]
    text = format_report_text(report)
    assert text.startswith("a.jsonl: ACCEPTED (format text, school sft, container jsonl)") and "line 2: invalid JSON" in text


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "gone.jsonl", config=config())


# -- malformed input: >= 200 kinds, each a bad line with a reason, none raising -----------------------
BASE_RECORDS = {
    "text": {"text": "t"},
    "messages": {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    "prompt_completion": {"prompt": "p", "completion": "c"},
    "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "preference_implicit": {"chosen": "c", "rejected": "r"},
    "alpaca": {"instruction": "i", "output": "o"},
    "sharegpt": {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
}
BAD_VALUES = [None, 0, -1.5, True, False, "", "   ", {}, {"a": "b"}, [1], ["x", 2], [[]], [None]]


def malformed_lines() -> list[str]:
    out = []
    for base in BASE_RECORDS.values():
        for key in base:
            for value in BAD_VALUES:
                out.append(json.dumps({**base, key: value}))
    for field, values in (("role", [None, 1, "bot", "", "USER", ["user"]]),
                          ("content", [None, 1, "", " ", {"x": 1}, [1], [{"type": "image"}]])):
        for value in values:
            msgs = [dict(m) for m in BASE_RECORDS["messages"]["messages"]]
            msgs[1][field] = value
            out.append(json.dumps({"messages": msgs}))
    for value in [None, 1, "robot", "", ["gpt"]]:
        out.append(json.dumps({"conversations": [{"from": "human", "value": "u"}, {"from": value, "value": "a"}]}))
    out += [
        "", "{", "}", "[", "]", "[]", "{}", "null", "true", "1", '"s"', "NaN", '{"text": NaN}',
        '{"text": Infinity}', '{"text": "a",}', "{'text': 'a'}", '{"text": "a"} trailing', '{"text": "a"}{"text": "b"}',
        '{"text": "\\x"}', '{"text": "a\x01b"}', "[" * 50_000, "{" * 1000, '{"a":' * 20_000 + "1" + "}" * 20_000,
        '{"text": "\\ud800"}', '{"text": "a", "n": 1e999}', '{"text": "a", "n": ' + "1" * 5000 + "}",
        '{"text"}', '{"text": }', "\x00\x00\x00", "\ufeff\ufeff", '{"TEXT": "a"}', '{" text": "a"}',
        '{"prompt": "p", "completion": "c", "prompt": 1}', '{"messages": [{"role": "user", "content": "u"}]}',
    ]
    return [line for line in out if line.strip() != ""]


def test_two_hundred_kinds_of_malformed_lines(tmp_path):
    bad = malformed_lines()
    assert len(bad) >= 200
    good = json.dumps({"text": "the one good line"})
    p = tmp_path / "odd name ✨ (1).jsonl"
    p.write_bytes((good + "\n" + "\n".join(bad) + "\n").encode("utf-8", "surrogatepass"))
    report = validate_file(p, config=config(max_bad_line_ratio=1.0), count_tokens=words)
    assert report.records_valid == 1 and report.records_bad == len(bad), [
        (n, line) for n, line in enumerate(bad, 2) if n not in {b.line for b in report.bad_lines}]
    assert all(b.reason for b in report.bad_lines)
    assert [n for n, _ in iter_valid_records(p, p.name, config().validation)] == [1]


# -- fuzz: validate_file never raises, and agrees with iter_valid_records --------------------------------
FRAGMENTS = [json.dumps(r) for r in BASE_RECORDS.values()] + [
    '{"text": NaN}', "[", "{", '{"text": ""}', "\xff", "\ufeff", "\r", '{"messages": []}', "[1, 2]", '{"chosen": 1}',
    json.dumps({"prompt": "p " * 6, "completion": "c " * 6})]  # 12 words: over the fuzz's max_length 8


MIXED_LENGTHS = "\n".join([text_line(3), text_line(12), "nope", text_line(8), text_line(9), FRAGMENTS[-1],
                           text_line(1)]).encode()  # short, long, bad, exactly max_length, long, long, short


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.one_of(
        st.binary(max_size=400),
        st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.integers(1, 16).map(text_line), st.text(max_size=40)),
                 max_size=12).map(lambda parts: "\n".join(parts).encode("utf-8", "surrogatepass")),
    ),
    name=st.sampled_from(["a.jsonl", "a.jsonl.gz", "a.json", "x", "A.JSONL", "d.txt", "a.csv", "a.tsv.gz"]),
    compress=st.booleans(),
    policy=st.sampled_from(["truncate", "drop", "reject"]),
)
@example(raw=MIXED_LENGTHS, name="a.jsonl", compress=False, policy="truncate")  # every run checks each policy
@example(raw=MIXED_LENGTHS, name="a.jsonl.gz", compress=True, policy="drop")
@example(raw=MIXED_LENGTHS, name="A.JSONL", compress=False, policy="reject")
@example(raw=b'[{"text": "a"}, ""', name="a.json", compress=False, policy="truncate")  # truncated JSON array
def test_fuzz_validate_never_raises(tmp_path, raw, name, compress, policy):
    p = tmp_path / "fuzz.bin"
    p.write_bytes(gzip.compress(raw) if compress else raw)
    cfg = config(length_policy=policy, max_length=8, max_line_bytes=1024, max_bad_line_ratio=0.5)
    report = validate_file(p, display_name=name, config=cfg, count_tokens=words)
    json.loads(report.to_json())
    format_report_text(report)
    assert report.lines == report.records_valid + report.records_bad
    assert report.accepted == (report.reason is None)
    assert report.examples == report.records_valid - report.records_dropped
    if policy != "drop":
        assert report.records_dropped == 0 and not report.dropped_lines
    if policy != "truncate":
        assert report.truncated == 0
    if report.lines:  # the file was read: the trainer sees exactly the records that validation found valid
        try:
            parsed = {n: ex for n, ex in iter_valid_records(p, name, cfg.validation)}
        except CorruptFileError as exc:  # it cannot be read to its end: rejected, saying so
            assert not report.accepted and str(exc) in report.reason
            return
        bad = {b.line: b.reason for b in report.bad_lines}
        too_long = {n for n, reason in bad.items() if "(length_policy reject)" in reason}
        dropped = {d.line for d in report.dropped_lines}
        assert not report.bad_lines_truncated and not report.dropped_lines_truncated
        assert set(bad) & set(parsed) == too_long  # a line is bad for its form, or (reject) for its length
        assert dropped <= set(parsed) and len(parsed) == report.records_valid + len(too_long)
        for n, ex in parsed.items():  # each length decision is the policy's, and is listed where it says
            action = length_action(max(measure(ex)), 8, policy)
            assert (n in too_long, n in dropped) == (action == "reject", action == "drop"), (n, ex, action)
        assert report.truncated == sum(length_action(max(measure(ex)), 8, policy) == "truncate"
                                       for ex in parsed.values())


@needs_shared_data
def test_real_hh_rlhf_gz_is_accepted_preference():
    path = SHARED / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"
    report = validate_file(path, config=config(), count_tokens=words)
    assert report.accepted and report.format == "preference_implicit" and report.records_valid == 2312
    assert report.trainable and report.school == "dpo"


@needs_stories
@needs_shared_data
def test_real_tokenizer_length_policy_on_gsm8k(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "models" / "stories260K"))

    def count(example):
        prompt = len(tokenizer(example["prompt"])["input_ids"])
        total = len(tokenizer(example["prompt"] + example["completion"])["input_ids"])
        return total, total - prompt

    with open(SHARED / "data" / "gsm8k_train.jsonl", encoding="utf-8") as f:
        head = [f.readline() for _ in range(200)]
    p = tmp_path / "gsm8k_train.jsonl"
    p.write_text("".join(head), encoding="utf-8")
    lengths = sorted(count({"prompt": json.loads(x)["question"], "completion": json.loads(x)["answer"]})[0]
                     for x in head)
    max_length = lengths[150]  # about a quarter of the records are longer
    longer = sum(n > max_length for n in lengths)
    cfg = config(length_policy="drop", max_length=max_length,
                 field_map={"gsm8k*.jsonl": {"question": "prompt", "answer": "completion"}})
    report = validate_file(p, config=cfg, count_tokens=count)
    assert report.accepted and report.records_dropped == longer > 0 and report.examples == 200 - longer
    assert report.tokens.max == max_length and report.tokens.min == lengths[0]
    assert 0 < report.trainable_token_ratio < 1


# -- batched token counting ------------------------------------------------------------------------------
def test_count_tokens_batch_matches_per_example_and_keeps_line_order(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "TOKEN_BATCH_EXAMPLES", 3)
    lines = [text_line(n) for n in (2, 9, 3, 4, 10, 1, 5, 11)]
    lines[2] = "broken"
    lines[6] = json.dumps({"text": "boom"})
    p = write_lines(tmp_path / "a.jsonl", lines)
    batches = []

    def count_batch(examples):
        batches.append(len(examples))
        if any(e["text"] == "boom" for e in examples):
            raise RuntimeError("boom")
        return [words(e) for e in examples]

    def count(example):
        if example["text"] == "boom":
            raise RuntimeError("boom")
        return words(example)

    cfg = config(length_policy="reject", max_length=8, max_bad_line_ratio=1.0)
    batched = validate_file(p, config=cfg, count_tokens_batch=count_batch)
    single = validate_file(p, config=cfg, count_tokens=count)
    assert batched == single
    assert [(b.line, b.reason.split(":")[0]) for b in batched.bad_lines] == [
        (2, "9 tokens > max_length 8 (length_policy reject)"), (3, "invalid JSON"), (5, "10 tokens > max_length 8 "
        "(length_policy reject)"), (7, "could not tokenize"), (8, "11 tokens > max_length 8 (length_policy reject)")]
    assert batched.records_valid == 3 and max(batches) <= 3 and 1 in batches  # the failing batch was split


def test_count_tokens_batch_wrong_result_count_is_isolated(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", [text_line(2), text_line(3)])
    report = validate_file(p, config=config(max_bad_line_ratio=1.0),
                           count_tokens_batch=lambda exs: [words(exs[0])])
    # the short result list is not trusted: each example is measured again on its own
    assert report.records_valid == 2 and report.records_bad == 0 and report.tokens.total == 5
    report = validate_file(p, config=config(max_bad_line_ratio=1.0), count_tokens_batch=lambda exs: [])
    assert report.records_bad == 2 and "returned 0 results for 1 examples" in report.bad_lines[0].reason


def test_preference_batch_measures_both_sides(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", [json.dumps({"chosen": "a b", "rejected": "c d e f"})])
    seen = []

    def count_batch(examples):
        seen.extend(examples)
        return [words(e) for e in examples]

    report = validate_file(p, config=config(), count_tokens_batch=count_batch)
    assert seen == [{"text": "a b"}, {"text": "c d e f"}] and report.tokens.max == 4


def test_jsonl_whose_first_line_is_an_array_is_not_rejected_for_it(tmp_path):
    p = write_lines(tmp_path / "a.jsonl", ["[1, 2]"] + [text_line(2)] * 19)
    report = validate_file(p, config=config())
    assert report.accepted and [b.line for b in report.bad_lines] == [1]


def test_one_line_json_array_longer_than_max_line_bytes_gets_a_hint(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text("[" + ",".join([json.dumps({"text": "x" * 100})] * 50) + "]", encoding="utf-8")
    report = validate_file(p, config=config(max_line_bytes=1024))
    assert not report.accepted and "name it 'big.json' to read it as an array" in report.reason
    assert "line is longer than max_line_bytes" in report.reason


def test_memory_stays_flat_on_a_large_file(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(validation, "MAX_LISTED_LINES", 100)
    p = tmp_path / "big.jsonl"
    good, bad = text_line(90).encode(), b'{"text": 1, "pad": "' + b"p" * 180 + b'"}'
    with open(p, "wb") as f:
        for i in range(28_000):
            f.write((bad if i % 4 == 0 else good) + b"\n")
    assert p.stat().st_size > 4_500_000
    tracemalloc.start()
    try:
        report = validate_file(p, config=config(max_bad_line_ratio=0.3), count_tokens=words)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.accepted and report.records_bad == 7_000 and len(report.bad_lines) == 100
    assert peak < 4_000_000, peak  # independent of the file size: 1 MiB read buffer + one token batch


# -- token figures after truncation, examples with nothing to learn (issue 8 item 3) ---------------------------
GSM8K_LIKE = {"prompt": "Natalia sold clips to 48 of her friends in April. " * 4 + "How many?\n",
              "completion": "She sold 48 + 24 = 72 clips.\n#### 72"}


def test_token_figures_are_counted_after_truncation_that_keeps_the_completion(tmp_path):
    from core.chat import count_tokens
    from core.hero import build_byte_tokenizer

    tok = build_byte_tokenizer()
    p = write_lines(tmp_path / "gsm8k.jsonl", [json.dumps(GSM8K_LIKE)] * 5)
    report = validate_file(p, config=config(max_length=64), count_tokens=lambda ex: count_tokens(ex, tok))
    learned = len(GSM8K_LIKE["completion"].encode()) + 1  # and EOS: all kept, the prompt's start is cut
    assert report.accepted and report.truncated == 5 and report.examples == 5
    assert (report.tokens.total, report.tokens.trainable) == (5 * 64, 5 * learned)
    assert report.trainable_token_ratio == learned / 64  # what training sees, not the untruncated 0.15
    assert report.tokens.max > 200 and report.tokens.cut == 5 * (report.tokens.max - 64)
    assert report.tokens.trainable_cut == 0


@pytest.mark.parametrize("policy", ["truncate", "drop", "reject"])
def test_an_example_with_no_trainable_token_is_dropped_or_rejected(tmp_path, policy):
    from core.chat import count_tokens
    from core.hero import build_byte_tokenizer

    tok = build_byte_tokenizer()  # a chat template that hides some assistant turns: nothing to learn there
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or 'hidden' not in m['content'] %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")

    def chat(answer: str) -> str:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]})

    p = write_lines(tmp_path / "mixed.jsonl", [chat("fine"), chat("hidden"), chat("ok")])
    report = validate_file(p, config=config(length_policy=policy, max_bad_line_ratio=0.5),
                           count_tokens=lambda ex: count_tokens(ex, tok))
    assert report.accepted and report.examples == 2 and report.records_untrainable == 1
    listed = report.bad_lines if policy == "reject" else report.dropped_lines
    assert [i.line for i in listed] == [2] and "no trainable token" in listed[0].reason
    kept = [count_tokens(json.loads(chat(a)), tok) for a in ("fine", "ok")]
    assert (report.tokens.total, report.tokens.trainable) == tuple(map(sum, zip(*kept, strict=True)))


def test_verdicts_hold_exactly_the_examples_and_training_reads_only_them(tmp_path):
    from core.records import RecordVerdicts, trainable_records

    lines = [text_line(3), "not json", text_line(20), "", text_line(5), json.dumps({"text": 7}), text_line(2)]
    p = write_lines(tmp_path / "a.jsonl", lines)
    verdicts = RecordVerdicts()
    report = validate_file(p, config=config(length_policy="drop", max_length=8, max_bad_line_ratio=0.6),
                           count_tokens=words, verdicts=verdicts)
    assert report.examples == verdicts.kept == 3 and list(verdicts.kept_lines()) == [1, 5, 7]
    assert verdicts.content_hash == report.content_hash and verdicts.lines == 7 and verdicts.format == "text"
    assert [line for line, _ in trainable_records(p, verdicts)] == [1, 5, 7]
