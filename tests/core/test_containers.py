"""core.containers: every quest file container, read the same way by validation, training and eval --
unit checks on real files, then the acceptance run: the real alpaca JSON array (and the same content as CSV
and Parquet) dropped into the inbox is validated and trained by the daemon; hostile files are rejected
with a report naming the record and the reason."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import containers
from core.config import RealmConfig
from core.daemon import Daemon
from core.formats import iter_valid_records
from core.ledger import Ledger
from core.records import RecordVerdicts, load_verdicts, trainable_records, verdicts_path_for
from core.validation import format_report_text, validate_file
from tests.conftest import SHARED_DATA, needs_shared

ALPACA = SHARED_DATA / "llamafactory_alpaca_en_demo.json"
MESSAGES = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def config(**validation) -> RealmConfig:
    return RealmConfig.model_validate({"validation": validation})


def validate(path: Path, name: str | None = None, **validation):
    verdicts = RecordVerdicts()
    report = validate_file(path, display_name=name, config=config(**validation), verdicts=verdicts)
    return report, verdicts


def kept(path: Path, verdicts: RecordVerdicts) -> list[tuple[int, dict]]:
    verdicts.save(verdicts_path_for(path))
    return list(trainable_records(path, load_verdicts(verdicts_path_for(path))))


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(("name", "content", "container"), [
    ("a.jsonl", b'{"text": "a"}\n', "jsonl"), ("a.ndjson", b'{"text": "a"}\n', "jsonl"),
    ("a.json", b'{"text": "a"}\n{"text": "b"}\n', "jsonl"), ("a.json", b' \n[{"text": "a"}]', "json"),
    ("A.JSON.GZ", gzip.compress(b'[{"text": "a"}]'), "json"), ("a.csv", b"text\na\n", "csv"),
    ("a.tsv.gz", gzip.compress(b"text\na\n"), "tsv"), ("a.txt", b"\n\nOnce upon a time\n", "txt"),
    ("a.txt", b"Q: hi\nA: hello\n", "transcript"), ("a.txt", b"user:  hi\n", "transcript"),
])
def test_detect(tmp_path, name, content, container):
    p = tmp_path / "stored"
    p.write_bytes(content)
    assert containers.detect(p, name) == container


def test_json_array_streams_elements_with_their_positions_and_matches_jsonl(tmp_path):
    records = [{"text": f"t{i}"} for i in range(5)] + [{"prompt": "x"}, 7, {"text": "last"}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    report, verdicts = validate(tmp_path / "a.json", max_bad_line_ratio=0.5)
    assert report.accepted and (report.container, report.format) == ("json", "text")
    assert [b.line for b in report.bad_lines] == [6, 7]
    assert report.bad_lines[0].reason.startswith("missing field 'completion'")
    assert report.bad_lines[1].reason == "record must be a JSON object, got number"
    assert [n for n, _ in kept(tmp_path / "a.json", verdicts)] == [1, 2, 3, 4, 5, 8]
    assert "record 6:" in format_report_text(report) and "positions in the JSON array" in format_report_text(report)
    assert report.content_hash == hashlib.sha256((tmp_path / "a.json").read_bytes()).hexdigest()
    # an element over max_line_bytes is a bad record (ijson's C backend reads a lone surrogate as "?")
    (tmp_path / "b.json").write_text('[{"text": "ok"}, {"text": "\\ud800"}, {"text": "' + "x" * 3000 + '"}]')
    report, _ = validate(tmp_path / "b.json", max_bad_line_ratio=0.9, max_line_bytes=1024)
    assert [b.line for b in report.bad_lines] == [3] and "max_line_bytes" in report.bad_lines[0].reason


def test_csv_cells_are_strings_json_columns_are_decoded_and_field_map_applies(tmp_path):
    rows = [{"question": "2+2?", "answer": "4", "id": "1"}, {"question": "[1, 2]?", "answer": "[3]", "id": "2"}]
    path = write_csv(tmp_path / "gsm.csv", rows)
    report, verdicts = validate(path, field_map={"gsm*.csv": {"question": "prompt", "answer": "completion"}})
    assert report.accepted and report.format == "prompt_completion"
    assert [ex for _, ex in kept(path, verdicts)] == [{"prompt": "2+2?", "completion": "4"},
                                                      {"prompt": "[1, 2]?", "completion": "[3]"}]  # strings stay
    chat = write_csv(tmp_path / "chat.tsv", [{"": "0", "messages": json.dumps(MESSAGES)}], delimiter="\t")
    report, verdicts = validate(chat)  # a pandas index column (no header name) is ignored
    assert report.accepted and report.format == "messages" and kept(chat, verdicts)[0][1] == {"messages": MESSAGES}
    pc = write_csv(tmp_path / "pc.csv", [{"prompt": json.dumps(MESSAGES[:1]), "completion": json.dumps(MESSAGES[1:])}])
    report, verdicts = validate(pc)
    assert report.accepted and kept(pc, verdicts)[0][1] == {"messages": MESSAGES}
    (tmp_path / "bad.csv").write_text('messages,x\n"not json",1\n"[]",2\n,3\n')
    report, _ = validate(tmp_path / "bad.csv")
    assert not report.accepted and [b.line for b in report.bad_lines] == [1, 2, 3]
    assert "column 'messages' must hold JSON" in report.bad_lines[0].reason
    assert "row 1: column 'messages'" in report.reason
    (tmp_path / "dup.csv").write_text("text,text\na,b\n")
    assert "more than once" in validate(tmp_path / "dup.csv")[0].reason
    (tmp_path / "quoted.csv").write_text('text\n"multi\nline ""quoted"" cell"\n\n"second"\n')
    report, verdicts = validate(tmp_path / "quoted.csv")
    assert [(n, ex["text"]) for n, ex in kept(tmp_path / "quoted.csv", verdicts)] == [
        (1, 'multi\nline "quoted" cell'), (3, "second")]


def test_parquet_reads_by_row_groups_with_native_types(tmp_path):
    rows = [{"messages": MESSAGES, "n": i} for i in range(2500)] + [{"messages": None, "n": -1}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=1000)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 3
    report, verdicts = validate(tmp_path / "a.parquet")
    assert report.accepted and (report.container, report.format, report.records_valid) == ("parquet", "messages", 2500)
    assert [b.line for b in report.bad_lines] == [2501]
    got = kept(tmp_path / "a.parquet", verdicts)
    assert len(got) == 2500 and got[-1] == (2500, {"messages": MESSAGES})


def test_plain_text_paragraphs_and_transcripts(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfFirst para\r\nstill first\n\n  \n\nSecond\n\n\xff\xfe bad\nx\n\nThird")
    report, verdicts = validate(tmp_path / "a.txt", max_bad_line_ratio=0.5)
    assert report.accepted and (report.container, report.format) == ("txt", "text")
    assert [b.line for b in report.bad_lines] == [8] and "not valid UTF-8" in report.bad_lines[0].reason
    assert kept(tmp_path / "a.txt", verdicts) == [(1, {"text": "First para\nstill first"}), (6, {"text": "Second"}),
                                                  (11, {"text": "Third"})]
    (tmp_path / "t.txt").write_text("Q: What is 2+2?\nA: 4\nexactly.\n\nSystem: be brief\nUser: hi\nAssistant: hello\n"
                                    "\nHuman:hey\n\nA: no question\n")
    report, verdicts = validate(tmp_path / "t.txt", max_bad_line_ratio=0.5)
    assert report.accepted and (report.container, report.format) == ("transcript", "messages")
    assert [(n, ex["messages"]) for n, ex in kept(tmp_path / "t.txt", verdicts)] == [
        (1, [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4\nexactly."}]),
        (5, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}]),
        (11, [{"role": "assistant", "content": "no question"}])]
    assert [b.line for b in report.bad_lines] == [9] and "no assistant" in report.bad_lines[0].reason


def test_iter_valid_records_and_trainable_records_agree_on_every_container(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(30)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    write_csv(tmp_path / "a.csv", rows)
    write_csv(tmp_path / "a.tsv", rows, delimiter="\t")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    expected = None
    for name in ("a.json", "a.csv", "a.tsv", "a.parquet", "a.jsonl.gz"):
        report, verdicts = validate(tmp_path / name)
        assert report.accepted and report.format == "alpaca" and report.examples == 30, name
        examples = [ex for _, ex in kept(tmp_path / name, verdicts)]
        assert examples == [ex for _, ex in iter_valid_records(tmp_path / name, name, config().validation)]
        expected = expected or examples
        assert examples == expected, name


def test_a_csv_row_that_is_not_utf8_is_a_bad_record_not_a_bad_file(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,n\nfirst,1\n\"caf\xe9 \xff\",2\nthird \xc3\xa9,3\nfourth,4\n")
    report, verdicts = validate(tmp_path / "a.csv", max_bad_line_ratio=0.5)
    assert report.accepted and report.records_valid == 3, report.reason
    assert [(b.line, b.reason) for b in report.bad_lines] == [(2, "row is not valid UTF-8")]
    assert [ex["text"] for _, ex in kept(tmp_path / "a.csv", verdicts)] == ["first", "third \u00e9", "fourth"]
    (tmp_path / "h.tsv").write_bytes(b"te\xffxt\nfirst\n")
    report, _ = validate(tmp_path / "h.tsv")
    assert not report.accepted and "header row is not valid UTF-8" in report.reason


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("object.json", b'{\n  "data": [{"text": "a"}]\n}\n', "a JSON object, not an array of records"),
    ("truncated.json", b'[{"text": "a"}, {"text": "b"}, {"text": "c', "invalid or truncated JSON at record 3"),
    ("ragged.csv", b"instruction,input,output\na,,b\nc,d\n", "row 2: row has 2 fields, the header has 3"),
    ("garbage.txt", bytes(range(256)) * 8, "binary data (NUL bytes)"),
    ("garbage.txt", b"\x80\xfd garbage \x81\n\n" * 20, "not valid UTF-8"),
    ("utf16.csv", "text\na\n".encode("utf-16"), "UTF-16"),
    ("broken.csv.gz", gzip.compress(b"text\n" + "".join(f"{i * i}\\n" for i in range(3000)).encode())[:900], "broken gzip"),
])
def test_hostile_files_are_rejected_naming_record_and_reason(tmp_path, name, content, needle):
    p = tmp_path / "stored"
    p.write_bytes(content)
    report, _ = validate(p, name)
    assert not report.accepted and needle in report.reason, report.reason
    assert needle in format_report_text(report)


def test_empty_parquet_is_rejected(tmp_path):
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), tmp_path / "e.parquet")
    report, _ = validate(tmp_path / "e.parquet")
    assert not report.accepted and report.reason == "empty file: no records" and report.container == "parquet"


# the acceptance run --------------------------------------------------------------------------------------
@needs_shared(ALPACA)
@pytest.mark.slow
def test_real_alpaca_json_csv_and_parquet_are_validated_and_trained(make_realm, restore_signals, tmp_path):
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    realm = make_realm(training={"max_length": 16, "micro_batch_size": 50, "packing": False, "save_steps": 1000},
                       schools={"*.parquet": {"epochs": 1}})
    hostile = {"object.json": b'{\n  "data": [{"text": "a"}]\n}\n',
               "truncated.json": ALPACA.read_bytes()[:5000],
               "ragged.csv": b"instruction,input,output\n" + b"a,,b\n" * 5 + b"c,d\n" * 5,
               "garbage.txt": bytes((i * 37) % 256 for i in range(4096)),
               "empty.parquet": None}
    (realm.inbox / "alpaca_en_demo.json").write_bytes(ALPACA.read_bytes())  # dropped as is
    write_csv(realm.inbox / "alpaca.csv", records)
    pq.write_table(pa.Table.from_pylist(records), realm.inbox / "alpaca.parquet", row_group_size=256)
    for name, content in hostile.items():
        if content is None:
            pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), realm.inbox / name)
        else:
            (realm.inbox / name).write_bytes(content)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0

    quests = {q["name"]: q for q in Ledger(realm.ledger_path).list_quests()}
    for name in ("alpaca_en_demo.json", "alpaca.csv", "alpaca.parquet"):
        q = quests[name]
        assert (q["state"], q["format"], q["records"], q["bad_records"]) == ("completed", "alpaca", 999, 0), q
        assert q["examples_trained"] == q["examples_total"] == 999 and q["steps"] == 20  # ceil(999 / 50)
        report = json.loads((realm.queue_dir("recently_completed") / (q["stored_name"] + ".report.json")).read_text())
        assert report["container"] == name.rsplit(".", 1)[1] and report["format"] == "alpaca"
    expected = {"object.json": "a JSON object, not an array", "truncated.json": "invalid or truncated JSON at record",
                "ragged.csv": "row 6: row has 2 fields, the header has 3", "garbage.txt": "binary data",
                "empty.parquet": "empty file: no records"}
    for name, needle in expected.items():
        q = quests[name]
        assert q["state"] == "failed" and needle in q["error"], (name, q["error"])
        report = json.loads((realm.queue_dir("failed") / (q["stored_name"] + ".report.json")).read_text())
        assert needle in report["reason"] and "Traceback" not in report["reason"]
