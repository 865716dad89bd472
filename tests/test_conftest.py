"""The suite's own guards can fail: a test that leaks a thread errors, a warning fails its test
(pyproject.toml's ``filterwarnings``), and a thread that ends within the grace period is fine."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]

INNER_TESTS = '''
import threading
import time
import warnings


def test_leaks_a_thread():
    threading.Thread(target=time.sleep, args=(60,), name="leaky", daemon=True).start()


def test_its_thread_ends_soon_after():
    threading.Thread(target=time.sleep, args=(0.2,), name="brief").start()


def test_warns():
    warnings.warn("this API is going away", DeprecationWarning, stacklevel=1)


def test_leaves_a_file_open():
    open(__file__)  # noqa: SIM115 - on purpose: a ResourceWarning when it is collected
    import gc
    gc.collect()


def test_clean():
    pass
'''


def test_the_thread_leak_fixture_and_warnings_as_errors_fail_tests(pytester):
    shutil.copy(ROOT / "tests" / "conftest.py", pytester.path / "conftest.py")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-c", str(ROOT / "pyproject.toml"), "--rootdir", str(pytester.path),
                                           "-p", "no:cacheprovider", "test_inner.py")
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("errors")) == (3, 2, 1), result.stdout.str()
    out = result.stdout.str()
    assert "ERROR at teardown of test_leaks_a_thread" in out and "'leaky' (target time.sleep" in out
    assert "FAILED test_inner.py::test_warns - DeprecationWarning: this API is going away" in out
    assert "FAILED test_inner.py::test_leaves_a_file_open" in out and "ResourceWarning" in out
