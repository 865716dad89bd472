"""The exports contract: where exports live, what they are called, and how to list them (no torch).

Written by :mod:`management.export` (``python -m training export``), read by the Tavern's vault page::

    <realm>/exports/<hero>-<checkpoint>-<format>[-<quantization>]/   one finished export per folder
    <realm>/exports/.tmp-<name>-<pid>/                                an export being written (never listed)

Every finished export holds :data:`MANIFEST` (``export.json``): ``format``, ``quantization``, ``hero``,
``created_at`` (unix seconds), ``source`` {``kind``, ``name``, ``global_step``, ``adapter_merged``},
``training`` {``base_model``, ``loss``, ``eval_loss``}, ``files`` {name: bytes} and, for GGUF exports,
``gguf`` (the conversion report) and ``ollama`` {``modelfile``, ``stop``}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.realm import Realm

EXPORTS_DIRNAME = "exports"
MANIFEST = "export.json"
MODELFILE = "Modelfile"
TMP_PREFIX = ".tmp-"
FORMATS = ("hf", "gguf", "ollama")
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""GGUF tensor types a gguf/ollama export can be written in (pure Python quantizers of the ``gguf`` package)."""
DEFAULT_QUANTIZATION = "f16"
_MAX_MANIFEST_BYTES = 1 << 20


def exports_dir(realm: Realm) -> Path:
    """``<realm>/exports``."""
    return realm.root / EXPORTS_DIRNAME


def export_name(hero: str, source_name: str, fmt: str, quantization: str | None) -> str:
    """``<hero>-<source>-<format>[-<quantization>]``, e.g. ``hero-step-00001234-gguf-q8_0``."""
    return f"{hero}-{source_name}-{fmt}" + (f"-{quantization}" if quantization else "")


def list_exports(realm: Realm) -> list[dict[str, Any]]:
    """Finished exports, newest first: each folder's ``export.json`` plus ``name`` (the folder) and ``bytes``
    (its files). Folders being written and unreadable manifests are skipped."""
    root = exports_dir(realm)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir() or p.is_symlink():
            continue
        try:
            f = p / MANIFEST
            if f.stat().st_size > _MAX_MANIFEST_BYTES:
                continue
            manifest = json.loads(f.read_text(encoding="utf-8"))
            size = sum(x.stat().st_size for x in p.iterdir() if x.is_file() and not x.is_symlink())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            out.append({**manifest, "name": p.name, "bytes": size})
    return sorted(out, key=lambda m: m.get("created_at") if isinstance(m.get("created_at"), (int, float)) else 0,
                  reverse=True)
