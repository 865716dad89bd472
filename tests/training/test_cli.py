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


# config and realm errors exit 3 / 5 with a sentence (issue 8) -------------------------------------------
def test_config_errors_exit_3_for_every_kind_of_bad_file(capsys, tmp_path):
    cases = {"dir": None, "latin1": b'{"hero": {"name": "h\xe9ro"}}', "deep": b"[" * 100_000,
             "nan": b'{"training": {"learning_rate": NaN, "save_steps": true}}'}
    for name, content in cases.items():
        realm = tmp_path / name
        realm.mkdir()
        if content is None:
            (realm / "config.json").mkdir()
        else:
            (realm / "config.json").write_bytes(content)
        for command in (["status"], ["config"]):
            assert main(["--realm", str(realm), *command], {}) == ExitCode.CONFIG, (name, command)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and "Traceback" not in err, err
    assert main(["--realm", str(tmp_path / "nan"), "config"], {}) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert "training.learning_rate: Input should be a finite number" in err
    assert "training.save_steps: Input should be a valid integer" in err


def test_init_over_a_bad_config_exits_3(capsys, tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"training": {"save_steps": true}}')
    assert main(["init", str(tmp_path)], {}) == ExitCode.CONFIG
    assert "training.save_steps" in capsys.readouterr().err
    (tmp_path / "config.json").write_bytes(b"\xff")
    assert main(["init", str(tmp_path)], {}) == ExitCode.CONFIG


def test_a_realm_that_does_not_exist_is_said_and_status_exits_5(capsys, tmp_path):
    missing = tmp_path / "no-such-realm"
    assert main(["status"], {"REALM_HOME": str(missing)}) == ExitCode.NOT_FOUND
    err = capsys.readouterr().err
    assert f"no realm at {missing}" in err and "REALM_HOME" in err and "init" in err
    assert main(["--realm", str(missing), "status", "--json"], {}) == ExitCode.NOT_FOUND
    assert "--realm" in capsys.readouterr().err
    assert not missing.exists()  # nothing was created by asking
    good = write_text_quest(tmp_path / "good.jsonl", 3)
    assert main(["--realm", str(missing), "validate", str(good)], {}) == ExitCode.OK  # works, but says so
    assert f"warning: no realm at {missing}" in capsys.readouterr().err


def test_step_arguments_and_status_take_ascii_digits_only(capsys, tmp_path):
    import argparse

    import pytest

    from tests.core.test_vault import JUNK_STEP_NAMES
    from training.cli import _global_step

    assert _global_step("step-00000012") == 12 and _global_step("12") == 12
    for text in [*(n for n in JUNK_STEP_NAMES if n == n.strip()), "١٢", "１２"]:  # (spaces around are fine)
        with pytest.raises(argparse.ArgumentTypeError):
            _global_step(text)
    from core.realm import init_realm

    realm = init_realm(tmp_path / "r")
    (realm.checkpoints_dir("hero") / "step-00000003").mkdir(parents=True)
    for name in JUNK_STEP_NAMES:
        (realm.checkpoints_dir("hero") / name).mkdir()
    assert main(["--realm", str(realm.root), "status", "--json"], {}) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["last_checkpoint"]["step"] == 3


def test_processes_arguments_are_checked_before_anything_starts(capsys, make_realm):
    realm = make_realm()
    for bad in ("0", "-2", "two", "100000"):
        assert main(["--realm", str(realm.root), "start-all", "--processes", bad], {}) == ExitCode.USAGE
        assert "--processes" in capsys.readouterr().err
    code = main(["--realm", str(realm.root), "start-all", "--no-tavern", "--accelerate-config",
                 str(realm.root / "missing.yaml")], {})
    assert code == ExitCode.CONFIG and "no such file" in capsys.readouterr().err
    fsdp = realm.root / "fsdp.yaml"
    fsdp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\n")
    code = main(["--realm", str(realm.root), "start-all", "--no-tavern", "--accelerate-config", str(fsdp)], {})
    assert code == ExitCode.CONFIG and "use DDP" in capsys.readouterr().err
    assert not realm.pid_file("supervisor").exists()  # nothing was started


def test_start_all_hands_the_processes_to_the_supervisor_which_launches_the_ranks(tmp_path):
    from training.cli import _launcher, _process_arguments, build_parser

    parser = build_parser()
    one = parser.parse_args(["start-all"])
    assert _process_arguments(one) == [] and _launcher(one) is None  # the default: one plain process
    assert _launcher(parser.parse_args(["supervise", "--processes", "1"])) is None
    start = parser.parse_args(["start-all", "--no-tavern", "--processes", "2"])
    supervise = parser.parse_args(["supervise", "--no-tavern", *_process_arguments(start)])
    launcher = _launcher(supervise)
    assert launcher[:3] == ["accelerate.commands.launch", "--num_processes", "2"] and "--multi_gpu" in launcher
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 4\n")
    own = parser.parse_args(["supervise", *_process_arguments(parser.parse_args(
        ["start-all", "--accelerate-config", str(ddp)]))])
    assert _launcher(own)[:3] == ["accelerate.commands.launch", "--config_file", str(ddp.resolve())]
