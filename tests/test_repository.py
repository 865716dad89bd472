"""Repository-level checks: lint, generated docs in sync, data folders free of Python, dependency direction."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (make test installs it)")
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_config_reference_is_current():
    from gen_config_reference import render

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert render(text) == text, "run: python scripts/gen_config_reference.py"


def test_data_folders_hold_no_python():
    for folder in ("inbox", "queue", "models"):
        assert not list((ROOT / folder).rglob("*.py")), f"{folder}/ is a data folder"


PACKAGES = ("core", "training", "tavern", "safety", "management")
DYNAMIC_IMPORTERS = ("import_module", "__import__", "_optional_import")


def _module_of(path: Path, root: Path) -> tuple[str, bool]:
    """``(dotted module name, is a package __init__)`` of a source file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module a source file may import, read from its AST, as full dotted names: ``import a.b`` gives
    ``a.b``; ``from a import b`` gives ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are
    resolved against ``module`` (``from .engine import x`` in ``core/daemon.py`` gives ``core.engine`` and
    ``core.engine.x``); ``importlib.import_module("a.b")`` with a literal name gives ``a.b``. Imports inside
    functions and ``if TYPE_CHECKING:`` blocks count too."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                if node.level - 1 > len(base_parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                target = ".".join(p for p in (base, node.module) if p)
            else:
                target = node.module or ""
            if target:
                found.add(target)
            found |= {f"{target}.{alias.name}" if target else alias.name for alias in node.names
                      if alias.name != "*"}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in DYNAMIC_IMPORTERS:
                found.add(node.args[0].value)
    return found


def _file_imports(path: Path) -> set[str]:
    module, is_package = _module_of(path, ROOT)
    return imported_modules(path.read_text(encoding="utf-8"), module, is_package)


def _within(name: str, modules: set[str]) -> bool:
    """``name`` is one of ``modules`` or inside one of them (``core.engine.Engine`` is within core.engine)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def test_imported_modules_reads_every_form_of_import():
    src = """
import os, core.ledger as led
from core import engine
from core.realm import Realm
from . import sibling
from .engine import Engine
from .. import other
import importlib
def later():
    from core.daemon import Daemon
    importlib.import_module("tavern.oracle")
"""
    found = imported_modules(src, "core.sub.mod")
    assert {"os", "core.ledger", "core", "core.engine", "core.realm", "core.realm.Realm", "core.sub", "core.sub.sibling",
            "core.sub.engine", "core.sub.engine.Engine", "core.other", "core.daemon", "core.daemon.Daemon",
            "tavern.oracle", "importlib"} == found
    assert imported_modules("from . import x\nfrom .y import z", "tavern", is_package=True) == {
        "tavern", "tavern.x", "tavern.y", "tavern.y.z"}
    with pytest.raises(ValueError):
        imported_modules("from ... import x", "core.mod")


LOOP_MODULES = {"core.engine", "core.daemon"}


def test_the_wall_checks_see_imports_a_substring_check_missed():
    """Each of these crosses a wall; the checks below, which guard the real packages, must see every one."""
    crossings = [("from core import engine", "tavern.pages.x", LOOP_MODULES),
                 ("from core import daemon as d", "tavern.x", LOOP_MODULES),
                 ("import core.engine as e", "tavern.x", LOOP_MODULES),
                 ("def f():\n    from core.daemon import Daemon", "tavern.x", LOOP_MODULES),
                 ("import importlib\nimportlib.import_module('training.cli')", "core.x", {"training"}),
                 ("from management import hooks", "safety.x", {"management"})]
    for src, module, forbidden in crossings:
        assert any(_within(name, forbidden) for name in imported_modules(src, module)), src
    assert not any(_within(name, LOOP_MODULES) for name in imported_modules(
        "from core import engine_notes\nfrom core.ledger import Ledger\nfrom . import engine", "tavern.x"))


@pytest.mark.parametrize("package,forbidden", [
    ("core", {"training", "tavern", "safety", "management"}),
    ("tavern", {"training", "safety", "management"}),
    ("safety", {"training", "tavern", "management"}),
    ("management", {"training", "tavern", "safety"}),
])
def test_dependencies_point_one_way(package, forbidden):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = {name for name in _file_imports(path) if _within(name, forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_tavern_never_imports_the_training_loop():
    for path in (ROOT / "tavern").rglob("*.py"):
        bad = {name for name in _file_imports(path) if _within(name, LOOP_MODULES)}
        assert not bad, f"{path.relative_to(ROOT)} imports the training loop: {sorted(bad)}"


def test_the_default_realm_config_is_valid():
    from core.config import load_config

    cfg = load_config(ROOT / "config.json")
    assert cfg.hero.base_model is None and cfg.tavern.host == "127.0.0.1"


#: Raw SQL against the ledger: what may appear only in ``core`` (the ledger is an API everywhere else).
SQL_PATTERNS = [r"\.(query|execute|executemany|executescript)\(", r"\b(SELECT|UPDATE|INSERT|DELETE)\b",
                r"\bimport sqlite3\b", r"\.transaction\(", r"\._conn\b"]
#: Justified exceptions, as "path: pattern" (none today).
SQL_EXCEPTIONS: set[str] = set()


def _sql_in(text: str) -> list[str]:
    import re

    return [p for p in SQL_PATTERNS if re.search(p, text)]


def test_the_sql_detector_sees_sql():
    assert _sql_in('rows = ledger.query("SELECT * FROM steps")') == [SQL_PATTERNS[0], SQL_PATTERNS[1]]
    assert _sql_in("with ledger.transaction() as c:\n    c.execute('UPDATE quests SET x=1')")
    assert _sql_in("import sqlite3") and _sql_in("ledger._conn.cursor()")
    assert not _sql_in("ledger.history(1, 2, max_points=10)  # selected, updated, inserted")


@pytest.mark.parametrize("package", ["tavern", "training", "safety", "management"])
def test_no_sql_outside_core(package):
    for path in (ROOT / package).rglob("*.py"):
        rel = path.relative_to(ROOT)
        found = [p for p in _sql_in(path.read_text(encoding="utf-8")) if f"{rel}: {p}" not in SQL_EXCEPTIONS]
        assert not found, f"{rel} talks SQL to the ledger ({found}): add a typed method to core/ledger.py"
