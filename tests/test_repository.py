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


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


@pytest.mark.parametrize("package,forbidden", [
    ("core", {"training", "tavern", "safety", "management"}),
    ("tavern", {"training", "safety", "management"}),
    ("safety", {"training", "tavern", "management"}),
    ("management", {"training", "tavern", "safety"}),
])
def test_dependencies_point_one_way(package, forbidden):
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & forbidden
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tavern_never_imports_the_training_loop():
    for path in (ROOT / "tavern").rglob("*.py"):
        src = path.read_text(encoding="utf-8")
        assert "core.engine" not in src and "core.daemon" not in src, path


def test_the_default_realm_config_is_valid():
    from core.config import load_config

    cfg = load_config(ROOT / "config.json")
    assert cfg.hero.base_model is None and cfg.tavern.host == "127.0.0.1"
