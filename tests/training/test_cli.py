"""The command line in-process: exit codes, config, validate, init, enqueue, status."""

from __future__ import annotations

import json

from tests.conftest import STORIES260K, needs_shared, write_text_quest
from training.cli import ExitCode, main


def test_config_schema(capsys, tmp_path):
    assert main(["--realm", str(tmp_path), "config", "--schema"], {}) == ExitCode.OK
    schema = json.loads(capsys.readouterr().out)
    assert "training" in schema["properties"]


def test_invalid_config_exit_code_names_every_key(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"training": {"learning_rate": 0, "lr": 1}}))
    assert main(["--realm", str(tmp_path), "status"], {}) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "training.learning_rate" in err and "training.lr: unknown key" in err


def test_usage_error(capsys):
    assert main(["no-such-command"], {}) == ExitCode.USAGE


def test_init_and_status_json_on_a_fresh_realm(capsys, tmp_path):
    realm = tmp_path / "r"
    assert main(["init", str(realm), "--base-model", "some/model"], {}) == ExitCode.OK
    assert json.loads((realm / "config.json").read_text())["hero"]["base_model"] == "some/model"
    for d in ("inbox/high", "queue/failed", "queue/recently_completed", "models"):
        assert (realm / d).is_dir()
    capsys.readouterr()
    assert main(["status", "--json"], {"REALM_HOME": str(realm)}) == ExitCode.OK
    status = json.loads(capsys.readouterr().out)
    assert status["global_step"] == 0 and status["hero"]["base_model"] == "some/model"
    assert {"name", "base_model", "parameters"} <= set(status["hero"])
    assert status["queue"]["queued"] == 0 and status["quests"] == [] and status["last_checkpoint"] is None


def test_validate_exit_codes(capsys, tmp_path):
    good = write_text_quest(tmp_path / "good.jsonl", 5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{]\n")
    realm = ["--realm", str(tmp_path / "realm")]
    assert main([*realm, "validate", str(good)], {}) == ExitCode.OK
    assert main([*realm, "validate", "--json", str(bad)], {}) == ExitCode.REJECTED
    assert main([*realm, "validate", str(tmp_path / "missing.jsonl")], {}) == ExitCode.NOT_FOUND


def test_validate_json_report_names_lines(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnope\n{"text": 3}\n')
    code = main(["--realm", str(tmp_path / "realm"), "validate", "--json", str(bad)], {})
    report = json.loads(capsys.readouterr().out)
    assert code == ExitCode.REJECTED
    assert [b["line"] for b in report["bad_lines"]] == [2, 3]


@needs_shared(STORIES260K)
def test_validate_uses_the_heros_tokenizer(capsys, tmp_path):
    realm = tmp_path / "realm"
    assert main(["init", str(realm), "--base-model", str(STORIES260K)], {}) == ExitCode.OK
    f = write_text_quest(tmp_path / "q.jsonl", 3)
    capsys.readouterr()
    assert main(["--realm", str(realm), "validate", "--json", str(f)], {}) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES260K))
    line = json.loads(f.read_text().splitlines()[0])["text"]
    assert report["tokens"]["min"] >= len(tok(line)["input_ids"])


def test_enqueue_never_overwrites(capsys, tmp_path):
    realm = tmp_path / "realm"
    src = write_text_quest(tmp_path / "data.jsonl", 2)
    for _ in range(2):
        assert main(["--realm", str(realm), "enqueue", str(src), "--priority", "high"], {}) == ExitCode.OK
    names = sorted(p.name for p in (realm / "inbox" / "high").iterdir())
    assert names == ["data-1.jsonl", "data.jsonl"]


def test_new_hero_then_eval_base(capsys, make_realm):
    realm = make_realm()
    args = ["--realm", str(realm.root)]
    assert main([*args, "new-hero", "--size", "nano"], {}) == ExitCode.OK
    assert main([*args, "new-hero", "--size", "nano"], {}) == ExitCode.ERROR  # never silently replaced
    f = write_text_quest(realm.root / "q.jsonl", 6)
    capsys.readouterr()
    assert main([*args, "eval", str(f), "--checkpoint", "base", "--every", "2", "--json"], {}) == ExitCode.OK
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 3 and 4.0 < result["loss"] < 7.0   # random init over 260 tokens: ~ln(260)=5.6
    assert main([*args, "eval", str(f)], {}) == ExitCode.NOT_FOUND      # no checkpoint yet
