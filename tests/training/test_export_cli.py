"""``python -m training export``: a real process writes the export and prints its path last; bad requests get
the CLI's exit codes with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, STORIES260K, cli, needs_shared, python_env
from tests.trained import trained_realm
from training.cli import ExitCode, main

pytestmark = needs_shared(STORIES260K)


@pytest.fixture(scope="module")
def realm(tmp_path_factory):
    return trained_realm(tmp_path_factory.mktemp("cli") / "realm")


@pytest.mark.slow
def test_export_ollama_in_a_real_process_prints_the_modelfile_path_last(realm):
    out = cli(realm, "export", "latest", "--format", "ollama", "--quantization", "q8_0")
    assert out.returncode == 0, out.stderr
    last = Path(out.stdout.strip().splitlines()[-1])
    assert last.name == "Modelfile" and last.is_file() and last.parent.parent == realm.root / "exports"
    assert f"ollama create hero -f {last}" in out.stdout
    assert "export: [100%] done" in out.stderr and "Loading weights" not in out.stderr
    gguf_file = last.parent / last.read_text().splitlines()[0].removeprefix("FROM ./")
    assert gguf_file.is_file() and gguf_file.stat().st_size > 100_000
    manifest = json.loads((last.parent / "export.json").read_text())
    assert manifest["ollama"]["stop"] == ["<|im_end|>", "<|im_start|>"] and manifest["quantization"] == "q8_0"


@pytest.mark.parametrize("args,code,message", [
    (["export", "step-00999999", "--format", "hf"], ExitCode.NOT_FOUND, "no checkpoint at global step 999999"),
    (["export", "nonsense", "--format", "gguf"], ExitCode.NOT_FOUND, "no checkpoint or version 'nonsense'"),
    (["export", "latest", "--format", "zip"], ExitCode.USAGE, "invalid choice: 'zip'"),
    (["export", "latest", "--format", "gguf", "--quantization", "q3_k"], ExitCode.USAGE, "invalid choice: 'q3_k'"),
    (["export", "latest", "--format", "hf", "--quantization", "q8_0"], ExitCode.USAGE, "applies to gguf and ollama"),
    (["export", "latest"], ExitCode.USAGE, "--format"),
])
def test_bad_requests_get_the_cli_exit_codes_and_write_nothing(realm, capsys, args, code, message):
    before = sorted(p.name for p in (realm.root / "exports").glob("*")) if (realm.root / "exports").exists() else []
    assert main(["--realm", str(realm.root), *args], {}) == code
    assert message in capsys.readouterr().err
    after = sorted(p.name for p in (realm.root / "exports").glob("*")) if (realm.root / "exports").exists() else []
    assert after == before


def test_an_existing_output_folder_is_refused(realm, capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    assert main(["--realm", str(realm.root), "export", "latest", "--format", "hf", "--output",
                 str(tmp_path / "taken")], {}) == ExitCode.REJECTED
    assert "exists" in capsys.readouterr().err
    assert main(["--realm", str(realm.root), "export", "best", "--format", "hf", "--output",
                 str(tmp_path / "new" / "hero-hf")], {}) == ExitCode.OK
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "new" / "hero-hf")
    assert (tmp_path / "new" / "hero-hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_mid_export_leaves_nothing(realm):
    """The Tavern stops a running export with SIGTERM: the temporary folder goes with it."""
    proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "export", "latest", "--format",
                             "gguf", "--quantization", "f32", "--output", str(realm.root / "exports" / "stopped")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
    for line in proc.stderr:  # wait until it is exporting, then stop it
        if "export: [" in line:
            break
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode in (0, 128 + signal.SIGTERM)
    time.sleep(0.1)
    leftovers = [p.name for p in (realm.root / "exports").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    if proc.returncode == 0:  # it finished before the signal landed: then it is complete
        assert (realm.root / "exports" / "stopped" / "export.json").is_file()
    else:
        assert not (realm.root / "exports" / "stopped").exists()
