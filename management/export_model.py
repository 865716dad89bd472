"""What an export is made of: the checkpoint resolved from a name, its model as one standalone set of weights
(a LoRA adapter merged into its base), its tokenizer with the hero's chat template, and the model card.

Sources (:func:`resolve_source`): ``latest`` and ``best`` (the vault's tags, :func:`core.vault.list_checkpoints_info`),
a global step (``1234`` or ``step-00001234``), ``base`` (the hero's starting weights) or a named version
(``models/<hero>/versions/NAME``, :mod:`management.versions`). Errors: :class:`SourceNotFound` (nothing by
that name; the message lists what exists), :class:`ExportError` (damaged checkpoint, adapter without its base).
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.checkpoint_layout import EXAMPLE_NAME, MODEL_CONFIG_FILE, TRAINER_STATE_JSON, parse_step_argument
from core.config import RealmConfig
from core.ledger import Ledger
from core.realm import Realm
from core.vault import TAG_BEST, TAG_LATEST, list_checkpoints_info
from management.versions import VERSION_NAME_RE, list_versions, quests_seen, versions_dir

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: a checkpoint holding adapter weights only


class ExportError(ValueError):
    """The export is refused; the message says why and what to do instead."""


class SourceNotFound(LookupError):
    """No checkpoint, version or base model by the given name; the message lists what exists."""


@dataclass(frozen=True)
class ExportSource:
    """``kind``: ``checkpoint``, ``version`` or ``base``; ``name``: ``step-00001234``, the version name or
    ``base``; ``path``: its folder; ``global_step``: None for the base model; ``state``: its
    ``trainer_state.json`` (empty for the base model); ``metadata``: a version's ``metadata.json``."""

    kind: str
    name: str
    path: Path
    global_step: int | None
    state: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return (self.path / ADAPTER_CONFIG).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_source(realm: Realm, config: RealmConfig, ledger: Ledger, spec: str) -> ExportSource:
    """The checkpoint named by ``spec``: ``latest``, ``best``, ``1234``/``step-00001234``, ``base`` or a
    version name (tried in that order). Raises :class:`SourceNotFound`."""
    hero = config.hero.name
    spec = (spec or "").strip()
    infos = list_checkpoints_info(realm, hero, ledger)
    root = realm.checkpoints_dir(hero)
    chosen = None
    if spec in (TAG_LATEST, TAG_BEST):
        chosen = next((i for i in infos if spec in i["tags"]), None)
        if chosen is None:
            raise SourceNotFound(f"the hero {hero!r} has no checkpoint yet, so no {spec} one "
                                 "(train first, or use base: its starting weights)")
    elif (step := _step(spec)) is not None:
        chosen = next((i for i in infos if i["step"] == step), None)
        if chosen is None:
            raise SourceNotFound(f"no checkpoint at global step {step}; {_available(infos, realm, hero)}")
    if chosen is not None:
        path = root / chosen["name"]
        return ExportSource("checkpoint", chosen["name"], path, chosen["step"], _read_json(path / TRAINER_STATE_JSON))
    if spec == "base":
        return _base_source(realm, config)
    if VERSION_NAME_RE.fullmatch(spec) and (versions_dir(realm, hero) / spec).is_dir():
        path = versions_dir(realm, hero) / spec
        state = _read_json(path / TRAINER_STATE_JSON)
        return ExportSource("version", spec, path, state.get("global_step"), state, _read_json(path / "metadata.json"))
    raise SourceNotFound(f"no checkpoint or version {spec[:80]!r}: use latest, best, base, a global step "
                         f"(1234 or {EXAMPLE_NAME}) or a version name; {_available(infos, realm, hero)}")


def _step(spec: str) -> int | None:
    try:
        return parse_step_argument(spec)
    except ValueError:
        return None


def _available(infos: list[dict[str, Any]], realm: Realm, hero: str) -> str:
    names = [i["name"] for i in infos][:8]
    versions = [v["name"] for v in list_versions(realm, hero)][:8]
    return f"checkpoints: {', '.join(names) or 'none'}; versions: {', '.join(versions) or 'none'}"


def _base_source(realm: Realm, config: RealmConfig) -> ExportSource:
    from core.hero import HeroError, resolve_model_source

    try:
        folder, newborn = resolve_model_source(realm, config.hero, create=False)
    except HeroError as exc:
        raise SourceNotFound(str(exc)) from None
    if not (Path(folder) / MODEL_CONFIG_FILE).is_file():
        raise SourceNotFound("the embedded default hero has not been created yet (the daemon creates it on its "
                             "first start; or run `python -m training new-hero`)")
    return ExportSource("base", "base", Path(folder), None, {})


# --- loading ----------------------------------------------------------------------------------------
def _stored_dtype(folder: Path):
    import torch

    config = _read_json(folder / MODEL_CONFIG_FILE)
    name = str(config.get("dtype") or config.get("torch_dtype"))
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def adapter_base(adapter_dir: Path, realm: Realm, config: RealmConfig) -> Path:
    """The base model folder of a PEFT adapter (:func:`core.adapters.adapter_base_path`: the base recorded
    at training time, else ``base_model_name_or_path`` when that is a folder), else the hero's base model
    (:func:`core.hero.resolve_model_source`); its weights SHA-256 checked against the one the engine recorded
    (:func:`core.adapters.check_adapter_base`). Raises :class:`ExportError`."""
    from core.adapters import AdapterError, adapter_base_path, check_adapter_base
    from core.hero import HeroError, resolve_model_source

    found = adapter_base_path(adapter_dir)
    if found is None:
        try:
            folder, _ = resolve_model_source(realm, config.hero, create=False)
        except HeroError as exc:
            raise ExportError(f"{adapter_dir.name} holds adapter weights only and its base model is missing: "
                              f"{exc}") from None
        if not (Path(folder) / MODEL_CONFIG_FILE).is_file():
            raise ExportError(f"{adapter_dir.name} holds adapter weights only and its base model {folder} is "
                              "missing")
        found = folder
    try:
        check_adapter_base(adapter_dir, found)
    except AdapterError as exc:
        raise ExportError(str(exc)) from None
    return Path(found)


def merge_adapter(adapter_dir: Path | str, base_dir: Path | str, hero_config):
    """The base model with the PEFT adapter of ``adapter_dir`` merged into its weights (``merge_and_unload``):
    a plain transformers model, computed in fp32 and returned in the base's stored dtype.

    Raises :class:`ExportError` when the adapter does not load onto the base.
    """
    import torch
    from peft import PeftModel

    from core.hero import load_model

    base = load_model(base_dir, hero_config, dtype=torch.float32)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 for a renamed attribute: not ours to fix
            warnings.filterwarnings("ignore", r".*is_gradient_checkpointing.*", FutureWarning)
            merged = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    except Exception as exc:
        raise ExportError(f"cannot merge the adapter {Path(adapter_dir).name} into {base_dir}: "
                          f"{type(exc).__name__}: {exc}") from exc
    return merged.to(_stored_dtype(Path(base_dir)))


def load_for_export(source: ExportSource, realm: Realm, config: RealmConfig):
    """``(model, tokenizer, model_dir)`` of ``source``: a standalone model (adapter merged) in eval mode on the
    CPU, the tokenizer with the hero's effective chat template (:func:`core.hero.load_tokenizer`), and the
    folder whose ``config.json`` describes the architecture. Weights are verified first.

    Raises :class:`ExportError` (damaged checkpoint, missing base), ``core.hero.HeroError``.
    """
    from core.checkpoint import verify_checkpoint, verify_weights
    from core.checkpoint_layout import CheckpointError
    from core.hero import load_model, load_tokenizer

    folder = source.path
    try:
        if source.kind != "base":
            (verify_weights if source.is_adapter else verify_checkpoint)(folder)
    except CheckpointError as exc:
        raise ExportError(f"{source.name} is damaged: {exc}") from None
    if source.is_adapter:
        model_dir = adapter_base(folder, realm, config)
        model = merge_adapter(folder, model_dir, config.hero)
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else model_dir
    else:
        model_dir = tokenizer_dir = folder
        model = load_model(folder, config.hero, dtype=_stored_dtype(folder))
    tokenizer = load_tokenizer(tokenizer_dir, config.hero)
    return model.eval(), tokenizer, model_dir


# --- model card -------------------------------------------------------------------------------------
def training_facts(source: ExportSource, ledger: Ledger, config: RealmConfig) -> dict[str, Any]:
    """``{"base_model", "global_step", "loss", "eval_loss", "quests", "recent_evals"}`` for the card and
    ``export.json``: quests trained into these weights (from the ledger, or the version's metadata)."""
    state, meta = source.state, source.metadata
    base = (state.get("hero") or {}).get("base_model", config.hero.base_model) if state else config.hero.base_model
    step = source.global_step
    if meta:
        quests, evals = meta.get("quests_seen") or [], (meta.get("metrics") or {}).get("recent_evals") or []
    elif step is not None:
        quests = quests_seen(ledger, step)
        evals = [e for e in ledger.evals() if e.get("global_step", 0) <= step][-10:]
    else:
        quests, evals = [], []
    return {"base_model": base, "global_step": step, "loss": state.get("loss"), "eval_loss": state.get("eval_loss"),
            "quests": quests, "recent_evals": evals}


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def model_card(*, hero: str, source: ExportSource, facts: dict[str, Any], model, fmt: str, usage: str,
               quantization: str | None, chat_template: str, adapter: bool) -> str:
    """README.md of an export: base model, quests trained, metrics, global step, how to use it."""
    base = facts["base_model"]
    hub_id = isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists()
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    params = sum(p.numel() for p in model.parameters())
    front = ["---", "library_name: transformers", "tags:", "- realm-of-training", "- fine-tuned"]
    if hub_id:
        front.append(f"base_model: {base}")
    lines = front + ["---", "", f"# {hero} ({source.name})", "",
                     f"Exported by Realm of Training on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
                     f"from {source.kind} `{source.name}`.", "", "| | |", "|---|---|",
                     f"| base model | {('`' + base + '`') if base else 'the embedded default hero (random init)'} |",
                     f"| architecture | {archs[0]}, {params:,} parameters |",
                     f"| global step | {facts['global_step'] if facts['global_step'] is not None else '- (base weights)'} |",
                     f"| training loss | {_num(facts['loss'])} |", f"| validation loss | {_num(facts['eval_loss'])} |",
                     f"| format | {fmt}{(' ' + quantization) if quantization else ''} |",
                     f"| adapter | {'LoRA adapter merged into the weights' if adapter else 'none (full weights)'} |",
                     "", "## Quests trained", ""]
    if facts["quests"]:
        lines += ["| quest | optimizer steps | examples trained |", "|---|---:|---:|"]
        lines += [f"| {_cell(q.get('name') or q.get('id'))} | {q.get('steps')} | "
                  f"{q.get('examples_trained')} |" for q in facts["quests"]]
    else:
        lines.append("None recorded (base weights, or a ledger without these steps).")
    if facts["recent_evals"]:
        lines += ["", "## Validation", "", "| global step | validation loss | examples |", "|---:|---:|---:|"]
        lines += [f"| {e.get('global_step')} | {_num(e.get('eval_loss'))} | {e.get('examples')} |"
                  for e in facts["recent_evals"]]
    lines += ["", "## Chat template", "", "```jinja", chat_template.strip(), "```", "", "## Use", "", usage.strip(), ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A user-supplied name as one Markdown table cell."""
    return " ".join(str(value).replace("|", "/").split())
