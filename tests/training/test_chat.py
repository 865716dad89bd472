"""``python -m training chat``: a real process on stories260K with stdin piped. Greedy answers are compared
with the oracle's engine run in this process on the same conversation, so multi-turn context and /reset
are checked, not just that something was printed."""

from __future__ import annotations

import json
import subprocess

import pytest

from core.realm import init_realm
from tests.conftest import PYTHON, STORIES260K, needs_shared, python_env

pytestmark = needs_shared(STORIES260K)


def chat(realm, stdin: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "training", "--realm", str(realm.root), "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=python_env(), cwd=realm.root)


def greedy(realm, messages, max_new_tokens):
    """What the oracle's engine answers (greedy) to ``messages``."""
    from tavern.oracle.engine import Engine, GenerationJob

    config = realm.load_config()
    pieces = []
    Engine(cache_size=1, device="cpu").generate(
        GenerationJob("t", "base", str(STORIES260K), messages, max_new_tokens, temperature=0.0,
                      hero=config.hero.model_dump(), realm_root=str(realm.root)),
        emit=pieces.append, cancelled=lambda: False)
    return "".join(pieces)


@pytest.fixture
def realm(tmp_path):
    return init_realm(tmp_path / "realm", base_model=str(STORIES260K))


@pytest.mark.slow
def test_multi_turn_chat_with_reset_save_and_end_of_input(realm):
    stdin = ("Once upon a time\n"
             "What did Lily see?\n"
             "/save convo.jsonl\n"
             "/reset\n"
             "/nonsense\n"
             "//slash message\n")  # then end of input: exit 0
    out = chat(realm, stdin, "--checkpoint", "base", "--temperature", "0", "--max-new-tokens", "24",
               "--system", "You tell stories.")
    assert out.returncode == 0, out.stderr
    assert "chatting with hero base" in out.stderr and "Loading weights" not in out.stderr
    replies = [line for line in out.stdout.split("hero> ")[1:]]
    assert len(replies) == 3
    system = {"role": "system", "content": "You tell stories."}
    u1, u2 = {"role": "user", "content": "Once upon a time"}, {"role": "user", "content": "What did Lily see?"}
    a1 = greedy(realm, [system, u1], 24)
    a2 = greedy(realm, [system, u1, {"role": "assistant", "content": a1}, u2], 24)
    a3 = greedy(realm, [system, {"role": "user", "content": "/slash message"}], 24)  # after /reset: no history
    assert replies[0].startswith(a1 + "\n") and replies[1].startswith(a2 + "\n") and replies[2].startswith(a3 + "\n")
    assert a2 != greedy(realm, [system, u2], 24)  # the second answer did depend on the first turn
    assert "(saved 5 messages to convo.jsonl)" in out.stdout and "(new conversation)" in out.stdout
    assert "(unknown command /nonsense" in out.stdout
    saved = [json.loads(line) for line in (realm.root / "convo.jsonl").read_text().splitlines()]
    assert saved == [{"messages": [system, u1, {"role": "assistant", "content": a1}, u2,
                                   {"role": "assistant", "content": a2}]}]


def test_quit_and_errors(realm, capsys, monkeypatch):
    import io

    from training.cli import ExitCode, main

    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\nnever sent\n"))
    assert main(["--realm", str(realm.root), "chat", "--checkpoint", "base"], {}) == ExitCode.OK
    assert "hero> " not in capsys.readouterr().out
    assert main(["--realm", str(realm.root), "chat", "--checkpoint", "latest"], {}) == ExitCode.NOT_FOUND
    assert "has no checkpoint yet" in capsys.readouterr().err
    assert main(["--realm", str(realm.root), "chat", "--temperature", "9"], {}) == ExitCode.USAGE
    assert "--temperature" in capsys.readouterr().err
