"""start-all with real processes: two at once, and after the Tavern's Stop (issue 8)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, cli, python_env

pytestmark = pytest.mark.slow


def test_two_start_all_at_once_one_wins_the_other_exits_4_with_a_sentence(make_realm):
    realm = make_realm()
    command = [PYTHON, "-m", "training", "--realm", str(realm.root), "start-all", "--no-tavern"]
    procs = [subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 4], results
        _, _, err = next(r for r in results if r[0] == 4)
        assert "Traceback" not in err and err.startswith("error: ") and "already" in err, err
        assert err.count("\n") == 1  # one sentence
        winner_out = next(out for code, out, _ in results if code == 0)
        pid = int(winner_out.split("supervisor started (pid ")[1].split(")")[0])
        assert int(realm.pid_file("supervisor").read_text()) == pid  # the pid file names the winner
    finally:
        stopped = cli(realm, "stop-all", "--timeout", "60")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "supervisor: stopped" in stopped.stdout and "daemon: stopped" in stopped.stdout


def _post(url: str, path: str) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, method="POST", data=b"", headers={"Origin": url})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:  # not listening yet
        return 0, {}


def test_after_the_taverns_stop_the_409_advice_works_literally(make_realm):
    import json
    import re
    import shlex
    import sys

    from tests.conftest import wait_for
    from tests.tavern.conftest import free_port

    port = free_port()
    realm = make_realm(tavern={"port": port})
    url = f"http://127.0.0.1:{port}"
    started = cli(realm, "start-all")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        wait_for(lambda: _post(url, "/api/controls/pause")[0] == 202, what="the daemon answering controls")
        _post(url, "/api/controls/resume")
        assert _post(url, "/api/controls/stop")[0] == 202  # the Tavern's Stop button
        code, body = wait_for(lambda: (r := _post(url, "/api/controls/pause"))[0] == 409 and r, what="a 409")
        advice = re.search(r"`([^`]+)`", body["error"]).group(1)
        argv = shlex.split(advice)
        assert argv[:5] == ["python", "-m", "training", "--realm", str(realm.root)], advice  # names this realm
        again = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=180,
                               env=python_env(), cwd="/")  # literally, from anywhere
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(lambda: _post(url, "/api/controls/pause")[0] == 202, what="the daemon back, answering controls")
        status = json.loads(cli(realm, "status", "--json").stdout)
        assert status["processes"]["daemon"]["state"] == "running"
    finally:
        stopped = cli(realm, "stop-all", "--timeout", "60")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
