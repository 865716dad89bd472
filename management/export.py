"""Export a checkpoint out of the realm: ``hf`` (a standalone Hugging Face model folder), ``gguf`` (llama.cpp)
or ``ollama`` (the GGUF plus a ``Modelfile``). ``python -m training export`` and the Vault page's button run
:func:`export_checkpoint`.

Each export is one folder, by default ``<realm>/exports/<hero>-<checkpoint>-<format>[-<quantization>]/``:

- ``hf``: ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer with the hero's
  chat template, ``README.md`` (model card: base model, quests trained, metrics, global step);
- ``gguf``: ``<name>.gguf`` (:mod:`management.gguf_export`) and ``README.md``;
- ``ollama``: the same GGUF, a ``Modelfile`` (:mod:`management.ollama`) and ``README.md``;

plus ``export.json`` (format, quantization, source checkpoint, files, conversion report). The folder is
written as ``.tmp-<name>-<pid>`` beside its final place, fsynced and renamed: a folder under its final
name is complete, and a failed or interrupted export leaves nothing (leftover ``.tmp-`` folders of dead
processes are removed by the next export). Exporting the same checkpoint, format and quantization again
replaces the earlier export (it is derived data); ``output`` must be a folder that does not exist yet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.checkpoint_layout import MODEL_CONFIG_FILE
from core.config import RealmConfig
from core.contract import process_alive
from core.exports import (
    DEFAULT_QUANTIZATION,
    FORMATS,
    MANIFEST,
    MODELFILE,
    QUANTIZATIONS,
    TMP_PREFIX,
    export_name,
    exports_dir,
)
from core.fsutil import fsync_tree
from core.ledger import Ledger
from core.realm import Realm
from management.export_model import (
    ExportError,
    ExportSource,
    SourceNotFound,
    load_for_export,
    model_card,
    resolve_source,
    training_facts,
)

Progress = Callable[[float, str], None]

__all__ = ["ExportError", "ExportResult", "ExportUsageError", "SourceNotFound", "check_request", "export_checkpoint"]


class ExportUsageError(ExportError):
    """A bad format or quantization (the command line's usage error)."""


@dataclass(frozen=True)
class ExportResult:
    """``folder``: the export folder; ``path``: what to hand on (hf: the folder, gguf: the ``.gguf`` file,
    ollama: the ``Modelfile``); ``manifest``: the content of ``export.json``."""

    folder: Path
    path: Path
    manifest: dict[str, Any]


def check_request(fmt: str, quantization: str | None) -> str | None:
    """The quantization to use (None for hf). Raises :class:`ExportUsageError`."""
    if fmt not in FORMATS:
        raise ExportUsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf":
        if quantization not in (None, "f32"):
            raise ExportUsageError("--quantization applies to gguf and ollama exports; hf keeps the trained weights")
        return None
    quantization = quantization or DEFAULT_QUANTIZATION
    if quantization not in QUANTIZATIONS:
        raise ExportUsageError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def _clean_stale(folder: Path) -> None:
    """Remove ``.tmp-*-<pid>`` folders whose process is gone (an export killed half-way)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = re.fullmatch(rf"{re.escape(TMP_PREFIX)}.+-(\d+)", p.name)
        if m and p.is_dir() and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _publish(tmp: Path, dest: Path, replace: bool) -> bool:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is replaced (when ``replace``) by renaming it aside
    first. Returns True when an earlier export was replaced."""
    if not dest.exists():
        os.rename(tmp, dest)
        return False
    if not replace:
        raise ExportError(f"{dest} exists; choose another --output or remove it")
    old = dest.with_name(f"{TMP_PREFIX}old-{dest.name}-{os.getpid()}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def _usage(fmt: str, folder: Path, path: Path, hero: str) -> str:
    if fmt == "hf":
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f'model = AutoModelForCausalLM.from_pretrained("{folder.name}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")\n```')
    if fmt == "gguf":
        return (f"```bash\nllama-cli -m {path.name} -cnv    # llama.cpp, chat template from the file\n```\n\n"
                f'Or transformers: `AutoModelForCausalLM.from_pretrained(".", gguf_file="{path.name}")`.')
    return f"```bash\nollama create {hero} -f {MODELFILE}\nollama run {hero}\n```"


def export_checkpoint(realm: Realm, config: RealmConfig, ledger: Ledger, checkpoint: str, fmt: str,
                      quantization: str | None = None, output: Path | str | None = None,
                      progress: Progress | None = None) -> ExportResult:
    """Export ``checkpoint`` (``latest``, ``best``, a global step, ``base`` or a version name) as ``fmt``.

    ``quantization``: for gguf/ollama, a key of :data:`management.gguf_export.QUANTIZATIONS` (default f16);
    ``output``: the export folder (must not exist; default ``exports/<hero>-<checkpoint>-<format>[-<q>]``);
    ``progress(fraction, message)`` is called as work proceeds. Logs an ``export_written`` event.

    Raises :class:`ExportUsageError` (format/quantization), :class:`SourceNotFound`, :class:`ExportError`
    (refused: unsupported architecture or template, damaged checkpoint, ``output`` exists),
    ``OSError``; nothing is left behind on any error.
    """
    report = progress or (lambda fraction, message: None)
    quantization = check_request(fmt, quantization)
    source = resolve_source(realm, config, ledger, checkpoint)
    hero = config.hero.name
    if fmt != "hf":  # refuse an unsupported architecture before loading anything
        from management.gguf_export import check_exportable

        arch_dir = source.path
        if source.is_adapter:
            from management.export_model import adapter_base

            arch_dir = adapter_base(source.path, realm, config)
        try:
            check_exportable(json.loads((arch_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{source.name}: {exc}") from None
    stem = f"{hero}-{source.name}"
    dest = (Path(output).expanduser().resolve() if output
            else exports_dir(realm) / export_name(hero, source.name, fmt, quantization))
    if output and dest.exists():
        raise ExportError(f"{dest} exists; choose another --output or remove it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest.parent)
    tmp = dest.parent / f"{TMP_PREFIX}{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        report(0.02, f"loading {source.name}")
        model, tokenizer, _ = load_for_export(source, realm, config)
        tmp.mkdir(parents=True)
        try:
            manifest, path = _write(fmt, tmp, dest, model, tokenizer, stem, quantization, source, report)
        except ValueError as exc:  # UnsupportedModel, TemplateNotExpressible: the export is refused
            raise ExportError(str(exc)) from None
        facts = training_facts(source, ledger, config)
        (tmp / "README.md").write_text(model_card(
            hero=hero, source=source, facts=facts, model=model, fmt=fmt, quantization=quantization,
            chat_template=tokenizer.chat_template or "", adapter=source.is_adapter,
            usage=_usage(fmt, dest, path, hero)), encoding="utf-8")
        manifest.update({"format": fmt, "quantization": quantization, "hero": hero, "created_at": time.time(),
                         "source": {"kind": source.kind, "name": source.name, "global_step": source.global_step,
                                    "adapter_merged": source.is_adapter},
                         "training": {k: facts[k] for k in ("base_model", "loss", "eval_loss")},
                         "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        report(0.95, "syncing to disk")
        fsync_tree(tmp)
        replaced = _publish(tmp, dest, replace=output is None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = dest / path.name if path != tmp else dest
    ledger.event("export_written", f"{source.name} exported as {fmt}{' ' + quantization if quantization else ''} "
                 f"to {dest}" + (" (replacing the earlier export)" if replaced else ""),
                 checkpoint=source.name, global_step=source.global_step, format=fmt, quantization=quantization,
                 path=str(final))
    report(1.0, "done")
    return ExportResult(dest, final, manifest)


def _write(fmt: str, tmp: Path, dest: Path, model, tokenizer, stem: str, quantization: str | None,
           source: ExportSource, report: Progress) -> tuple[dict[str, Any], Path]:
    """Write the format's files into ``tmp``; returns (manifest part, the path to hand on, inside tmp)."""
    if fmt == "hf":
        report(0.3, "writing safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return {}, tmp
    from management.gguf_export import write_gguf
    from management.ollama import derive_template, modelfile_text

    template = derive_template(tokenizer) if fmt == "ollama" else None  # refuse before the slow part
    staging = tmp / ".tokenizer"
    tokenizer.save_pretrained(staging)
    gguf_name = f"{stem}-{quantization}.gguf"
    gguf_report = write_gguf(model, tokenizer, staging, tmp / gguf_name, quantization,
                             name=f"{dest.name}", description=f"{source.kind} {source.name} of a Realm of "
                             "Training hero", progress=report)
    shutil.rmtree(staging)
    manifest: dict[str, Any] = {"gguf": {"file": gguf_name, **gguf_report}}
    if template is None:
        return manifest, tmp / gguf_name
    context = getattr(model.config, "max_position_embeddings", None)
    (tmp / MODELFILE).write_text(modelfile_text(gguf_name, template, context), encoding="utf-8")
    manifest["ollama"] = {"modelfile": MODELFILE, "stop": list(template.stop)}
    return manifest, tmp / MODELFILE

