"""core.checkpoint_layout: the one checkpoint naming, its readers, and a guard that it is not copied again."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core import checkpoint_layout as layout
from core.ledger import Ledger
from core.realm import Realm

ROOT = Path(__file__).resolve().parents[2]
HERO = "hero"


def _checkpoint(root: Path, name: str, **state) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / layout.TRAINER_STATE_JSON).write_text(json.dumps({layout.KEY_GLOBAL_STEP: 0, **state}))
    (d / layout.TRAINER_STATE_PT).write_bytes(b"x" * 10)
    return d


# names ---------------------------------------------------------------------------------------------
def test_checkpoint_name_round_trips():
    assert layout.checkpoint_name(1234) == "step-00001234" == layout.EXAMPLE_NAME
    assert layout.checkpoint_name(0) == "step-00000000"
    for step in (0, 7, 1234, layout.MAX_GLOBAL_STEP):
        name = layout.checkpoint_name(step)
        assert layout.match_step(name) == step == layout.step_of(Path("/x") / name)
        assert layout.is_checkpoint_name(name)


@pytest.mark.parametrize("step", [-1, layout.MAX_GLOBAL_STEP + 1, 10 ** 12])
def test_checkpoint_name_refuses_steps_it_could_not_read_back(step):
    with pytest.raises(ValueError, match="no checkpoint name"):
        layout.checkpoint_name(step)


def test_checkpoint_name_refuses_non_integers():
    with pytest.raises(TypeError):
        layout.checkpoint_name(12.0)
    with pytest.raises(TypeError):
        layout.checkpoint_name("12")


@pytest.mark.parametrize("name", [
    "step-1234", "step-000012345", "step-00001234\n", "step-00001234 ", " step-00001234", "xstep-00001234",
    "step-00001234.corrupt", ".tmp-step-00001234-77", ".old-step-00001234", "step-", "", "STEP-00001234",
    "step-0000123a", "step-+0001234", "step-\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668",  # Arabic-Indic
    "step-\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",  # fullwidth digits: int() would parse both
    "a/step-00001234", None, 1234, b"step-00001234",
])
def test_only_exact_ascii_names_are_checkpoints(name):
    assert layout.match_step(name) is None
    assert not layout.is_checkpoint_name(name)


def test_step_of_raises_for_other_names():
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        layout.step_of("step-12")


@pytest.mark.parametrize("text,step", [("1234", 1234), (" 1234 ", 1234), ("step-00001234", 1234),
                                       ("0", 0), ("99999999", 99999999), ("\tstep-00000005\n", 5)])
def test_parse_step_argument(text, step):
    assert layout.parse_step_argument(text) == step


@pytest.mark.parametrize("text", ["step-18", "123456789", "step-", "", "12a", "-5", "+5", "1e3",
                                  "\u0661\u0662", "step-\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668"])
def test_parse_step_argument_refuses(text):
    with pytest.raises(ValueError, match="not a global step"):
        layout.parse_step_argument(text)


# listing -------------------------------------------------------------------------------------------
def test_list_checkpoints_orders_by_step_and_ignores_everything_else(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (30, 5, 200, 10):
        _checkpoint(root, layout.checkpoint_name(step))
    for other in ("step-00000999.corrupt", ".tmp-step-00000300-1", ".old-step-00000400", ".trash-step-0000050-ab",
                  "step-999999999", "step-7", "notes"):
        (root / other).mkdir()
    (root / "step-00000500").write_text("a file, not a folder")
    outside = _checkpoint(tmp_path, "elsewhere")
    (root / "step-00000600").symlink_to(outside, target_is_directory=True)
    found = layout.list_checkpoints(root)
    assert [p.name for p in found] == ["step-00000005", "step-00000010", "step-00000030", "step-00000200"]
    assert layout.latest_checkpoint(root) == root / "step-00000200"


def test_listing_an_absent_folder_is_empty(tmp_path):
    assert layout.list_checkpoints(tmp_path / "nope") == []
    assert layout.latest_checkpoint(tmp_path / "nope") is None


def test_read_checkpoint_info(tmp_path):
    d = _checkpoint(tmp_path, "step-00000007", **{layout.KEY_GLOBAL_STEP: 7, layout.KEY_LOSS: 1.5})
    assert layout.read_checkpoint_info(d)[layout.KEY_LOSS] == 1.5
    (d / layout.TRAINER_STATE_JSON).write_text('{"loss": 1.0}')
    with pytest.raises(layout.CheckpointError, match="no global_step"):
        layout.read_checkpoint_info(d)
    (d / layout.TRAINER_STATE_JSON).write_text('{"global_st')  # truncated
    with pytest.raises(layout.CheckpointError, match="cannot read"):
        layout.read_checkpoint_info(d)
    (d / layout.TRAINER_STATE_JSON).unlink()
    with pytest.raises(layout.CheckpointError, match="cannot read"):
        layout.read_checkpoint_info(d)


def test_every_reader_sees_the_same_checkpoints(tmp_path):
    """The engine, the vault, `status`, the Tavern's status, the disk guard and backups read one layout:
    a 9-digit or short name, Unicode digits or a quarantined folder is a checkpoint for none of them."""
    from core import checkpoint as ckpt
    from core.vault import list_checkpoints_info
    from management.disk_guard import estimate_checkpoint_bytes
    from tavern.status import latest_checkpoint as tavern_latest
    from training.status import _last_checkpoint

    realm = Realm.at(tmp_path / "realm")
    realm.ensure_layout()
    root = realm.checkpoints_dir(HERO)
    for step in (40, 8):
        _checkpoint(root, layout.checkpoint_name(step), **{layout.KEY_GLOBAL_STEP: step})
    for junk in ("step-999999999", "step-9", "step-\u0669\u0669\u0669\u0669\u0669\u0669\u0669\u0669",
                 "step-00000050.corrupt"):
        big = _checkpoint(root, junk)
        (big / "padding.bin").write_bytes(b"\0" * 100_000)
    expected = ["step-00000008", "step-00000040"]
    assert [p.name for p in ckpt.list_checkpoints(root)] == expected
    ledger = Ledger(realm.ledger_path)
    try:
        assert [c["name"] for c in reversed(list_checkpoints_info(realm, HERO, ledger))] == expected
    finally:
        ledger.close()
    assert tavern_latest(realm, HERO) == {"global_step": 40, "name": "step-00000040",
                                          "path": f"models/{HERO}/checkpoints/step-00000040"}
    assert _last_checkpoint(realm, HERO) == {"step": 40, "path": str(root / "step-00000040")}
    newest = sum(f.stat().st_size for f in (root / "step-00000040").iterdir())
    assert estimate_checkpoint_bytes(root) == int(newest * 1.1)


def test_core_checkpoint_reexports_the_layout():
    from core import checkpoint as ckpt

    for name in ("checkpoint_name", "step_of", "list_checkpoints", "latest_checkpoint", "read_checkpoint_info",
                 "CheckpointError", "TRAINER_STATE_JSON", "TRAINER_STATE_PT", "WEIGHTS_FILE", "FORMAT_VERSION"):
        assert getattr(ckpt, name) is getattr(layout, name), name
    keys = {k for k in dir(ckpt) if k.startswith("KEY_")}
    assert {"KEY_GLOBAL_STEP", "KEY_CURSOR", "KEY_OPTIMIZER", "KEY_RNG"} <= keys
    for k in keys:  # none redefined beside the layout
        assert getattr(ckpt, k) is getattr(layout, k), k


def test_the_layout_and_its_torch_free_readers_do_not_import_torch():
    code = ("import sys\n"
            "import core.checkpoint_layout, core.vault, core.fsutil, tavern.status, tavern.app, training.status\n"
            "import management.vault_ops, management.versions, management.disk_guard, training.cli\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'core.checkpoint', 'core.engine') "
            "if m in sys.modules)\n"
            "print('heavy:', heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "heavy: []"


# the naming lives in one module --------------------------------------------------------------------
PACKAGES = ("core", "training", "tavern", "safety", "management", "bench")
LAYOUT_MODULE = ROOT / "core" / "checkpoint_layout.py"
_PREFIX_LITERAL = re.compile(r"(?<![\w-])step-")  # "step-..." but not "global-step-pill"
_PADDED_STEP = re.compile(r"(?:[:%]0?8d|\\d\{8\}|\[0-9\]\{8\}|\\d\+\)?\$)")


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def naming_copies(path: Path, root: Path = ROOT) -> list[str]:
    """Places in ``path`` that spell the checkpoint naming out: a string holding the ``step-`` prefix, a
    zero-padded 8-digit format (``:08d``, ``%08d``) or a step regex (``\\d{8}``, ``\\d+)$``). Docstrings and
    comments (examples for readers) do not count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if _PREFIX_LITERAL.search(node.value) or _PADDED_STEP.search(node.value):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.FormattedValue) and node.format_spec is not None:
            spec = "".join(v.value for v in node.format_spec.values
                           if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if re.fullmatch(r"0?8d", spec):
                found.append(f"{path.relative_to(root)}:{node.lineno}: format spec {spec!r}")
    return found


def test_the_guard_finds_each_kind_of_copy(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text('"""Docstring: step-00001234 is fine here."""\n'
                      'import re\n'
                      'A = re.compile(r"^step-(\\d{8})$")\n'
                      'B = re.compile(r"^x-(\\d+)$")\n'
                      'def f(n):\n'
                      '    """step-XXXXXXXX in a docstring is fine."""\n'
                      '    return f"ckpt-{n:08d}", "ckpt-%08d" % n  # step- in a comment is fine\n'
                      'C = "global-step-pill"\n', encoding="utf-8")
    hits = naming_copies(sample, tmp_path)
    assert [h.split(":")[1] for h in hits] == ["3", "4", "7", "7"], hits


def test_checkpoint_naming_lives_only_in_the_layout_module():
    copies = [hit for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
              if path != LAYOUT_MODULE for hit in naming_copies(path)]
    assert not copies, "import core.checkpoint_layout instead of spelling the naming out:\n" + "\n".join(copies)
    assert naming_copies(LAYOUT_MODULE), "the one place spells the prefix out, and the guard sees it there"
