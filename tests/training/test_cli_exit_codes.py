"""The command line's exit codes mean what they say: an unexpected error exits ERROR (one line on stderr, the
traceback in the log), Ctrl-C exits 130, and the control commands (``stop`` among them) refuse when no
daemon runs, so that nothing is left pending for the next start."""

from __future__ import annotations

import logging
import subprocess

import training.cli as cli
from core.ledger import Ledger
from tests.conftest import PYTHON, python_env
from training.cli import CONTROL_COMMANDS, ExitCode, main


def _raising(exc: BaseException):
    def handler(args, realm, config, environ):
        raise exc
    return handler


def test_an_unexpected_error_exits_error_with_one_line_and_the_traceback_in_the_log(capsys, monkeypatch,
                                                                                     make_realm):
    realm = make_realm()
    monkeypatch.setitem(cli.COMMANDS, "status", _raising(RuntimeError("the disk ate it\nsecond line")))
    assert main(["--realm", str(realm.root), "status"], {}) == ExitCode.ERROR
    assert ExitCode.ERROR != ExitCode.REJECTED
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected RuntimeError: the disk ate it (the traceback is in ")
    logged = (realm.logs / cli.CLI_LOG).read_text()
    assert "`python -m training status`" in logged and "Traceback (most recent call last)" in logged
    assert "RuntimeError: the disk ate it" in logged and "in handler" in logged


def test_with_log_level_debug_the_traceback_is_printed(capsys, monkeypatch, make_realm, caplog):
    realm = make_realm()
    monkeypatch.setitem(cli.COMMANDS, "status", _raising(ValueError("boom")))
    with caplog.at_level(logging.DEBUG, logger="training.cli"):
        assert main(["--realm", str(realm.root), "--log-level", "DEBUG", "status"], {}) == ExitCode.ERROR
    [record] = [r for r in caplog.records if r.name == "training.cli" and r.levelno == logging.ERROR]
    assert "ValueError: boom" in record.getMessage() and record.exc_info[0] is ValueError
    assert not (realm.logs / cli.CLI_LOG).exists()


def test_the_daemons_unexpected_error_goes_to_its_log_with_the_traceback(monkeypatch, make_realm, caplog):
    """The supervisor's crash classifier reads the traceback from the daemon's log (its stderr)."""
    realm = make_realm()
    monkeypatch.setitem(cli.COMMANDS, "daemon", _raising(MemoryError("no room")))
    with caplog.at_level(logging.INFO):
        assert main(["--realm", str(realm.root), "daemon"], {}) == ExitCode.ERROR
    [record] = [r for r in caplog.records if r.name == "training.cli" and r.levelno == logging.ERROR]
    assert record.exc_info[0] is MemoryError and "MemoryError: no room" in record.getMessage()


def test_an_unexpected_error_without_a_realm_folder_still_says_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "config", _raising(OSError(5, "Input/output error")))
    assert main(["--realm", str(tmp_path / "nowhere"), "config"], {}) == ExitCode.ERROR
    warning, *error = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: no realm at ")  # the missing realm folder is said first
    assert len(error) == 1 and "no log: the realm has no logs/ folder" in error[0]


def test_ctrl_c_exits_130(capsys, monkeypatch, make_realm):
    realm = make_realm()
    monkeypatch.setitem(cli.COMMANDS, "status", _raising(KeyboardInterrupt()))
    assert main(["--realm", str(realm.root), "status"], {}) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_real_process_exits_error_not_rejected_on_an_unexpected_error(make_realm):
    """End to end through ``python -m training``: a ledger that is not a database breaks ``status``."""
    realm = make_realm()
    realm.ledger_path.parent.mkdir(parents=True, exist_ok=True)
    realm.ledger_path.write_bytes(b"this is not a SQLite database, " * 100)
    out = subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "status"],
                         capture_output=True, text=True, timeout=120, env=python_env())
    assert out.returncode == ExitCode.ERROR, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: unexpected "), out.stderr
    assert "Traceback (most recent call last)" in (realm.logs / cli.CLI_LOG).read_text()


def test_stop_is_a_control_command_and_every_control_command_refuses_without_a_daemon(capsys, make_realm):
    assert list(CONTROL_COMMANDS) == ["pause", "resume", "skip", "stop"]
    realm = make_realm()
    for command in CONTROL_COMMANDS:
        assert main(["--realm", str(realm.root), command], {}) == ExitCode.NOT_FOUND
        assert "the training daemon is not running: nothing to " + command in capsys.readouterr().err
    ledger = Ledger(realm.ledger_path)
    try:
        assert ledger.pending_commands() == []  # nothing left for the next start to obey
    finally:
        ledger.close()


def test_a_reader_that_goes_away_is_not_an_error(make_realm):
    """``status | head -1``: the pipe closes under the command; it exits 141 (128 + SIGPIPE) without a word,
    as shell tools do, instead of an ``unexpected BrokenPipeError``."""
    realm = make_realm()
    proc = subprocess.Popen([PYTHON, "-m", "training", "--realm", str(realm.root), "status"], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes its first line: every write fails
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == ExitCode.BROKEN_PIPE == 141, err
    assert err == ""
