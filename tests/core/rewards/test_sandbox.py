"""A custom reward file runs in a worker process: one that raises, hangs, prints garbage or dies scores 0,
is reported, and the caller goes on (real subprocesses, real timeouts)."""

import os
import time
from pathlib import Path

import pytest

from core.rewards.sandbox import SandboxedReward


def reward_file(tmp_path: Path, body: str, name: str = "reward.py") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


GOOD = ("from __future__ import annotations\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Score:\n"
        "    value: float\n\n\ndef reward(prompt, completion, **refs):\n"
        "    return Score(len(completion) / 10 + refs.get('bonus', 0)).value\n")


def test_a_good_reward_returns_its_value_and_reuses_one_worker(tmp_path):
    with SandboxedReward(reward_file(tmp_path, GOOD)) as r:
        assert r("p", "hello") == 0.5
        pid = r._proc.pid
        assert r("p", "hello world", bonus=1) == pytest.approx(2.1)
        assert r._proc.pid == pid and r.failures == []
    assert r._proc is None


def test_a_reward_that_raises_scores_zero_with_the_traceback_and_the_next_call_works(tmp_path):
    path = reward_file(tmp_path, "def reward(prompt, completion, **refs):\n"
                                 "    if completion == 'bad':\n        raise KeyError('no such thing')\n"
                                 "    return 1.0\n")
    seen = []
    with SandboxedReward(path, on_failure=seen.append) as r:
        assert r("p", "bad") == 0.0
        assert r("p", "good") == 1.0
    assert [f.kind for f in r.failures] == ["raised"] and seen == r.failures
    assert "KeyError: 'no such thing'" in r.failures[0].message and "reward.py" in r.failures[0].message


def test_a_reward_that_hangs_is_killed_after_the_timeout_and_replaced(tmp_path):
    path = reward_file(tmp_path, "import time\ndef reward(prompt, completion, **refs):\n"
                                 "    if completion == 'hang':\n        while True:\n            time.sleep(0.01)\n"
                                 "    return 2.0\n")
    with SandboxedReward(path, timeout_seconds=0.5) as r:
        assert r("p", "x") == 2.0
        hung_pid = r._proc.pid
        started = time.monotonic()
        assert r("p", "hang") == 0.0
        assert time.monotonic() - started < 3.0
        with pytest.raises(ProcessLookupError):
            os.kill(hung_pid, 0)  # the hung worker is gone (killed and reaped)
        assert r("p", "x") == 2.0  # a fresh worker
    assert [f.kind for f in r.failures] == ["timeout"]
    assert "longer than 0.5 s" in r.failures[0].message


@pytest.mark.parametrize("body,what", [
    ("def reward(prompt, completion, **refs):\n    print('garbage', flush=True)\n    return 'very good'\n", "str"),
    ("import os\ndef reward(prompt, completion, **refs):\n    os.write(1, b'{not json\\n')\n    return None\n",
     "NoneType"),
    ("def reward(prompt, completion, **refs):\n    return float('nan')\n", "nan"),
    ("def reward(prompt, completion, **refs):\n    return [1.0]\n", "list"),
])
def test_a_reward_that_prints_or_returns_garbage_scores_zero(tmp_path, body, what):
    with SandboxedReward(reward_file(tmp_path, body)) as r:
        assert r("p", "x") == 0.0
        assert r("p", "y") == 0.0
    assert [f.kind for f in r.failures] == ["garbage", "garbage"]
    assert what in r.failures[0].message


def test_prints_do_not_corrupt_the_protocol(tmp_path):
    body = ("import os, sys\ndef reward(prompt, completion, **refs):\n    print('{\"ok\": true, \"value\": 99}')\n"
            "    os.write(1, b'garbage\\n')\n    sys.__stdout__.write('more garbage\\n')\n    return 0.25\n")
    with SandboxedReward(reward_file(tmp_path, body)) as r:
        assert [r("p", "x") for _ in range(3)] == [0.25, 0.25, 0.25]


def test_a_reward_that_kills_its_worker_or_exits_scores_zero(tmp_path):
    body = "import os\ndef reward(prompt, completion, **refs):\n    os._exit(7) if completion == 'die' else None\n    return 1\n"
    with SandboxedReward(reward_file(tmp_path, body)) as r:
        assert r("p", "die") == 0.0
        assert r("p", "live") == 1.0
    assert r.failures[0].kind == "crashed" and "worker process died" in r.failures[0].message


@pytest.mark.parametrize("body,needle", [
    ("def reward(prompt, completion\n", "SyntaxError"),
    ("raise SystemExit(3)\n", "SystemExit"),
    ("x = 1\n", "defines no function reward"),
])
def test_a_file_that_does_not_load_scores_zero_without_restarting_each_call(tmp_path, body, needle):
    with SandboxedReward(reward_file(tmp_path, body)) as r:
        assert r("p", "x") == 0.0
        assert r("p", "x") == 0.0
        assert r._proc is None
    assert [f.kind for f in r.failures] == ["load", "load"] and needle in r.failures[0].message


def test_a_fixed_file_loads_again(tmp_path):
    path = reward_file(tmp_path, "def reward(prompt, completion\n")
    with SandboxedReward(path) as r:
        assert r("p", "x") == 0.0
        path.write_text(GOOD)
        os.utime(path, (time.time() + 5, time.time() + 5))
        assert r("p", "x") == 0.1


def test_memory_is_capped(tmp_path):
    body = "def reward(prompt, completion, **refs):\n    x = bytearray(3 * 1024 ** 3)\n    return 1.0\n"
    with SandboxedReward(reward_file(tmp_path, body), memory_limit_bytes=512 * 1024 ** 2) as r:
        assert r("p", "x") == 0.0
    assert r.failures[0].kind == "raised" and "MemoryError" in r.failures[0].message
