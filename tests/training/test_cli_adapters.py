"""The command line and adapters, presets and the memory estimate: init --preset, config and doctor print
the estimate, QLoRA refused with exit 3 where it cannot run, status --json names the adapter, eval reads an
adapter checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from core.daemon import Daemon
from tests.conftest import write_text_quest
from training.cli import ExitCode, main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: QLoRA may run")


def test_init_with_a_preset_writes_its_training_settings_and_prints_the_estimate(capsys, tmp_path):
    realm = tmp_path / "r"
    assert main(["init", str(realm), "--preset", "24gb"], {}) == ExitCode.OK
    training = json.loads((realm / "config.json").read_text())["training"]
    assert training == {"adapter": "lora", "micro_batch_size": 4, "gradient_accumulation_steps": 4,
                        "gradient_checkpointing": True, "mixed_precision": "bf16"}
    out = capsys.readouterr().out
    assert "preset 24gb" in out and "training memory estimate (LoRA, cuda, precision bf16" in out
    assert main(["init", str(tmp_path / "x"), "--preset", "2gb"], {}) == ExitCode.USAGE


@NO_CUDA
def test_a_qlora_preset_on_this_machine_is_written_with_a_note_and_refused_at_start(capsys, tmp_path):
    realm = tmp_path / "q"
    assert main(["init", str(realm), "--preset", "8gb"], {}) == ExitCode.OK
    assert "note: this machine cannot train this config" in capsys.readouterr().out
    for command in (["config"], ["daemon", "--until-idle"], ["start-all"]):
        assert main(["--realm", str(realm), *command], {}) == ExitCode.CONFIG, command
        err = capsys.readouterr().err
        assert "training.adapter: qlora" in err and "CUDA" in err
    assert not (realm / "models" / "hero").exists()       # nothing was loaded or created
    assert main(["--realm", str(realm), "status", "--json"], {}) == ExitCode.OK   # status still works
    assert json.loads(capsys.readouterr().out)["hero"]["adapter"] == "qlora"
    assert main(["--realm", str(realm), "doctor"], {}) == ExitCode.REJECTED
    out = capsys.readouterr().out
    assert "!! adapter: training.adapter: qlora" in out and "fix: set training.adapter" in out


def test_config_keeps_stdout_json_and_prints_the_estimate_on_stderr(capsys, make_realm):
    realm = make_realm(training={"adapter": "lora", "gradient_checkpointing": True})
    assert main(["--realm", str(realm.root), "config"], {}) == ExitCode.OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["training"]["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0,
                                                           "target_modules": None}
    assert "training memory estimate (LoRA, cpu" in captured.err and "gradient checkpointing on" in captured.err


def test_doctor_prints_the_memory_estimate(capsys, make_realm):
    realm = make_realm()
    main(["--realm", str(realm.root), "doctor"], {})
    out = capsys.readouterr().out
    assert "ok adapter: full fine-tuning: runs here" in out
    assert "ok memory estimate: training memory estimate (full fine-tuning, cpu" in out and "available:" in out


def test_status_and_eval_of_a_lora_hero(capsys, make_realm):
    realm = make_realm(training={"adapter": "lora", "lora": {"r": 4}, "eval_holdout_every": 4})
    args = ["--realm", str(realm.root)]
    assert main([*args, "status", "--json"], {}) == ExitCode.OK
    hero = json.loads(capsys.readouterr().out)["hero"]
    assert hero["adapter"] == "lora" and hero["trainable_parameters"] is None   # not trained yet
    write_text_quest(realm.inbox / "q.jsonl", 16)
    assert Daemon(realm, realm.load_config(), until_idle=True).run() == 0
    capsys.readouterr()
    assert main([*args, "status", "--json"], {}) == ExitCode.OK
    hero = json.loads(capsys.readouterr().out)["hero"]
    assert hero["adapter"] == "lora" and 0 < hero["trainable_parameters"] < hero["parameters"]
    held = write_text_quest(realm.root / "held.jsonl", 16)   # the quest's records (its held-out ones: --every 4)
    results = {}
    for checkpoint in ("latest", "base"):
        assert main([*args, "eval", str(held), "--checkpoint", checkpoint, "--every", "4", "--json"], {}) == 0
        results[checkpoint] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert results["latest"] < results["base"]   # the adapter learned the quest: eval read base + adapter
    assert main([*args, "vault", "list"], {}) == ExitCode.OK
    assert "lora adapter only, a full checkpoint would be about" in capsys.readouterr().out
