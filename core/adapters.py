"""Adapters on the hero with PEFT: LoRA (Hu et al. 2021, arXiv:2106.09685) and QLoRA (Dettmers et al. 2023,
arXiv:2305.14314: the frozen base in 4-bit NF4 with double quantization through bitsandbytes).

``training.adapter`` null is full fine-tuning (every weight trained, the default). With ``lora`` or
``qlora`` the base model is frozen and a LoRA adapter ``W x + (alpha / r) B A x`` is trained on the linear
layers named by ``training.lora.target_modules`` (null: :func:`default_target_modules`, every
``nn.Linear`` inside the repeated decoder blocks, found from the model; never the LM head or embeddings).

**Checkpoints** of an adapter hero hold PEFT's ``save_pretrained`` output (``adapter_config.json`` +
``adapter_model.safetensors``: the adapter weights only), the tokenizer, and the same trainer state as a
full checkpoint (optimizer over the adapter's parameters, scheduler, RNG, cursor), plus
``trainer_state.json["adapter"]`` (:data:`core.checkpoint_layout.KEY_ADAPTER`): the adapter type and
settings, its trainable parameters, and the base model's identity with a SHA-256 of its weight files
(:func:`weights_sha256`). Resuming verifies that hash: an adapter only fits the weights it was trained
on, so a different base is a clear :class:`AdapterError`, never a silent mismatch. Resume is as exact as
for full checkpoints (the adapter's initial weights come from ``training.seed``).

**Where the base lives.** On a CPU the base is fp32. On CUDA with ``lora`` it is loaded in the training
precision (bf16/fp16: frozen weights need no fp32 master copy) and the adapter stays fp32 (PEFT's
``autocast_adapter_dtype``); with ``qlora`` its linear layers are 4-bit NF4 and the rest in the training
precision (not upcast to fp32: frozen weights gain nothing from it). QLoRA needs CUDA and bitsandbytes: :func:`environment_problems`
says why it cannot run, and the CLI refuses such a config before anything starts (exit 3).

**Inference** (the oracle, ``eval``): :func:`load_merged` loads the base, applies the adapter and merges it
(``merge_and_unload``): a plain model, as fast as the base. :func:`core.hero.load_model` calls it for any
adapter folder.

**For the schools** (a reference model, e.g. DPO): :func:`adapter_disabled` runs the hero as its frozen base
(PEFT's ``disable_adapter``), exact and free when the quest starts from the base; when the adapter was
already trained before the quest, the reference is the adapter's quest-start state:
:func:`adapter_state` copies it (megabytes, not the model).

Data parallel later: nothing here assumes one process (each rank loads the same base and adapter; the
weights hash is cached per file, see :func:`weights_sha256`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.checkpoint_layout import (
    ADAPTER_CONFIG_FILE,
    KEY_ADAPTER,
    KEY_ADAPTER_BASE,
    KEY_ADAPTER_TYPE,
    KEY_HERO,
    KEY_TRAINABLE_PARAMETERS,
    CheckpointError,
    read_checkpoint_info,
)
from core.config import ConfigError, HeroConfig, RealmConfig, TrainingConfig
from core.fsutil import sha256_file, write_json_atomic
from core.hero import HeroError, count_parameters, load_model, resolve_model_source
from core.realm import Realm

ADAPTER_TYPES = ("lora", "qlora")
BASE_HASH_CACHE = "base_weights_sha256.json"
"""Per-hero cache (``models/<hero>/``) of weight-file SHA-256s keyed by path, size, mtime and inode."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PEFT_NOISE = r".*(is_gradient_checkpointing|gradient_checkpointing_enable|activation_checkpointing).*"


class AdapterError(HeroError):
    """The adapter and the base do not fit (another base, a full checkpoint where an adapter was expected,
    or the other way round), or an adapter folder cannot be loaded. The message says what to do."""


# --- the environment -----------------------------------------------------------------------------------
def environment_problems(training: TrainingConfig) -> list[str]:
    """Why ``training`` cannot run on this machine, as ``"training.adapter: reason"`` lines ([] when it can).

    Only QLoRA has requirements: bitsandbytes installed and a CUDA GPU visible to torch (torch is imported
    only then). Cheap for every other config.
    """
    if training.adapter != "qlora":
        return []
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("training.adapter: qlora loads the base in 4-bit NF4 with bitsandbytes, which is not "
                        "installed (pip install 'bitsandbytes>=0.45' on a machine with a CUDA GPU)")
    import torch

    if not torch.cuda.is_available():
        problems.append(f"training.adapter: qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels) and torch "
                        f"{torch.__version__} sees none here; use \"lora\" (or null for full fine-tuning) on "
                        "this machine")
    return problems


def check_environment(config: RealmConfig, source: str = "config.json") -> None:
    """Raise :class:`core.config.ConfigError` naming every reason ``config`` cannot train here."""
    problems = environment_problems(config.training)
    if problems:
        raise ConfigError(source, problems)


# --- targets and parameters -------------------------------------------------------------------------------
def default_target_modules(model) -> list[str]:
    """Sorted last-component names of the ``nn.Linear`` modules inside the model's repeated blocks (a name
    with a numeric component, e.g. ``model.layers.3.self_attn.q_proj``), the output embeddings excluded.

    For Qwen3/Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: the attention and MLP
    projections, the same set as PEFT's ``"all-linear"`` (tested). bitsandbytes' ``Linear4bit`` is an
    ``nn.Linear``, so a 4-bit base gives the same names. Raises :class:`AdapterError` when there is none.
    """
    import torch.nn as nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and module is not head and any(p.isdigit() for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise AdapterError(f"{type(model).__name__} has no nn.Linear inside numbered blocks: set "
                           "training.lora.target_modules to the names of the layers to adapt")
    return sorted(names)


def is_adapter_model(model) -> bool:
    """True for a PEFT model (the hero with an adapter)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Run ``model`` (a PEFT model) as its frozen base inside the block: PEFT's ``disable_adapter``.
    Raises :class:`AdapterError` for a model without an adapter."""
    if not is_adapter_model(model):
        raise AdapterError("the hero has no adapter to disable (training.adapter is null)")
    with model.disable_adapter():
        yield


def adapter_state(model) -> dict[str, Any]:
    """A detached CPU copy of the adapter's weights (PEFT's ``get_peft_model_state_dict``): e.g. a school's
    reference at quest start. Raises :class:`AdapterError` for a model without an adapter."""
    from peft import get_peft_model_state_dict

    if not is_adapter_model(model):
        raise AdapterError("the hero has no adapter (training.adapter is null)")
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


# --- the base's identity ---------------------------------------------------------------------------------
def weight_files(folder: Path | str) -> list[Path]:
    """The model weight files directly in ``folder`` (sorted; an adapter's own file excluded)."""
    d = Path(folder)
    return sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                  and not p.name.startswith("adapter_"))


def weights_sha256(folder: Path | str, cache_file: Path | None = None) -> str:
    """SHA-256 (hex) over the weight files of a model folder: ``sha256("name sha256\\n" for each file)``.

    Each file's hash is cached in ``cache_file`` (JSON) under its real path with its size, mtime and inode,
    so a multi-GB base is read once, not at every start; a changed file is hashed again. The cache is best
    effort (an unwritable folder just means no cache). Raises :class:`AdapterError` when the folder holds no
    weight file.
    """
    files = weight_files(folder)
    if not files:
        raise AdapterError(f"{folder} holds no model weight file ({', '.join(WEIGHT_SUFFIXES)})")
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(Path(cache_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
        if not isinstance(cache, dict):
            cache = {}
    changed = False
    digest = hashlib.sha256()
    for f in files:
        real = os.path.realpath(f)
        st = os.stat(real)
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = cache.get(real)
        if not (isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str)):
            entry = {"stat": key, "sha256": sha256_file(real)}
            cache[real] = entry
            changed = True
        digest.update(f"{f.name} {entry['sha256']}\n".encode())
    if changed and cache_file is not None:
        try:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache_file, cache)
        except OSError:
            pass
    return digest.hexdigest()


def base_identity(model, source: str, hero_config: HeroConfig, newborn: bool, cache_file: Path | None) -> dict:
    """What an adapter checkpoint records about its base: configured ``base_model``, resolved ``path``,
    ``architecture``, ``parameters``, ``newborn`` and ``weights_sha256`` (:func:`weights_sha256`)."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {"base_model": hero_config.base_model, "path": str(Path(source).resolve()), "architecture": archs[0],
            "parameters": count_parameters(model), "newborn": newborn,
            "weights_sha256": weights_sha256(source, cache_file)}


# --- loading for training ------------------------------------------------------------------------------
@dataclass
class LoadedHero:
    """What :func:`load_for_training` returns. ``model``: on its device, in train mode (a PEFT model with an
    adapter); ``tokenizer_source``: the folder to load the tokenizer from; ``adapter``: the
    :data:`KEY_ADAPTER` record for checkpoints (None for full fine-tuning); ``notes``: ``(event kind,
    message)`` warnings for the ledger."""

    model: Any
    tokenizer_source: str
    newborn: bool
    adapter: dict | None = None
    notes: list[tuple[str, str]] = field(default_factory=list)


def _base_dtype(device_type: str, mixed_precision: str):
    import torch

    if device_type == "cuda" and mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.float32


def _load_base(source: str, config: RealmConfig, device, mixed_precision: str):
    """The frozen base for an adapter (see the module doc for its precision), on ``device``."""
    t = config.training
    if t.adapter == "qlora":
        check_environment(config)
        import torch
        from transformers import BitsAndBytesConfig

        compute = _base_dtype("cuda", mixed_precision)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
        index = device.index if device.index is not None else torch.cuda.current_device()
        # not peft.prepare_model_for_kbit_training: it upcasts every non-4-bit weight (embeddings, LM head,
        # norms) to fp32, +2 bytes per parameter (2.5 GB on an 8B model) for frozen weights that autocast
        # reads in bf16 anyway; RMSNorm computes in fp32 inside. Freezing is get_peft_model's job, and
        # non-reentrant checkpointing needs no input gradients.
        return load_model(source, config.hero, dtype=compute, quantization_config=quant, device_map={"": index})
    model = load_model(source, config.hero, dtype=_base_dtype(device.type, mixed_precision))
    return model.to(device)


def _lora_config(targets: list[str], lora) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def _settings(peft_model) -> dict[str, Any]:
    cfg = peft_model.peft_config["default"]
    return {"r": int(cfg.r), "alpha": float(cfg.lora_alpha), "dropout": float(cfg.lora_dropout),
            "target_modules": sorted(cfg.target_modules)}


def enable_gradient_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (exact: the recomputed
    forward restores the RNG; works with frozen inputs, so no ``enable_input_require_grads`` is needed)."""
    target = model.get_base_model() if is_adapter_model(model) else model
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.24 name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_for_training(realm: Realm, config: RealmConfig, checkpoint: Path | None, state: dict | None, device,
                      mixed_precision: str) -> LoadedHero:
    """The hero's model for training: from ``checkpoint`` (its ``trainer_state`` in ``state``) or, when None,
    from the base (``hero.base_model`` or the embedded default, created if missing).

    Full fine-tuning: the whole model in fp32. An adapter: the base (:func:`_load_base`) with a new LoRA
    adapter (initialised from ``training.seed``, the global RNG untouched) or the checkpoint's, whose base
    hash must match. ``training.gradient_checkpointing`` is applied. ``device``: a ``torch.device``;
    ``mixed_precision``: accelerate's no|bf16|fp16.

    Raises :class:`AdapterError` for a base that differs from the checkpoint's or a full/adapter mismatch,
    :class:`core.hero.HeroError` when a model does not load, :class:`core.config.ConfigError` for QLoRA where
    it cannot run.
    """
    t, hero = config.training, config.hero
    ckpt_adapter = (state or {}).get(KEY_ADAPTER) if checkpoint is not None else None
    if checkpoint is not None and (ckpt_adapter is None) != (t.adapter is None):
        raise AdapterError(_mismatch_message(realm, config, checkpoint, ckpt_adapter))
    if t.adapter is None:
        source = str(checkpoint) if checkpoint is not None else None
        newborn = bool(((state or {}).get(KEY_HERO) or {}).get("newborn", hero.base_model is None))
        if source is None:
            source, newborn = resolve_model_source(realm, hero, seed=t.seed)
        model = load_model(source, hero).to(device)
        loaded = LoadedHero(model, source, newborn)
    else:
        loaded = _load_adapter_hero(realm, config, checkpoint, ckpt_adapter, device, mixed_precision)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    loaded.model.train()
    return loaded


def _load_adapter_hero(realm: Realm, config: RealmConfig, checkpoint: Path | None, ckpt_adapter: dict | None,
                       device, mixed_precision: str) -> LoadedHero:
    import torch
    from peft import PeftModel, get_peft_model

    t, hero = config.training, config.hero
    notes: list[tuple[str, str]] = []
    source, newborn = resolve_model_source(realm, hero, create=checkpoint is None, seed=t.seed)
    cache = realm.hero_dir(hero.name) / BASE_HASH_CACHE
    base = _load_base(source, config, device, mixed_precision)
    identity = base_identity(base, source, hero, newborn, cache)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_NOISE, category=FutureWarning)
        if checkpoint is None:
            targets = t.lora.target_modules or default_target_modules(base)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)  # the adapter's init (A: Kaiming uniform, B: zeros) from the seed
                model = get_peft_model(base, _lora_config(targets, t.lora))
            tokenizer_source = source
        else:
            _verify_base(checkpoint, ckpt_adapter, identity, hero)
            model = PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True)
            tokenizer_source = str(checkpoint)
            notes += _setting_notes(checkpoint, ckpt_adapter, t, _settings(model))
    adapter = {KEY_ADAPTER_TYPE: t.adapter, KEY_ADAPTER_BASE: identity,
               KEY_TRAINABLE_PARAMETERS: count_parameters(model, trainable_only=True), **_settings(model)}
    return LoadedHero(model, tokenizer_source, newborn, adapter, notes)


def _mismatch_message(realm: Realm, config: RealmConfig, checkpoint: Path, ckpt_adapter: dict | None) -> str:
    hero = config.hero.name
    if ckpt_adapter is None:
        return (f"checkpoint {checkpoint.name} of hero {hero!r} is a full fine-tuning checkpoint but "
                f"training.adapter is {config.training.adapter!r}. To train an adapter on top of it, give the "
                f"realm a new hero.name and set hero.base_model to {checkpoint} (or to a version promoted "
                f"from it: `python -m training vault promote`); or set training.adapter back to null")
    return (f"checkpoint {checkpoint.name} of hero {hero!r} holds a {ckpt_adapter.get(KEY_ADAPTER_TYPE)} adapter "
            f"but training.adapter is null (full fine-tuning). Set training.adapter to "
            f"{ckpt_adapter.get(KEY_ADAPTER_TYPE)!r} to go on training it, or use a new hero.name to start a "
            "full fine-tuning")


def _verify_base(checkpoint: Path, ckpt_adapter: dict, identity: dict, hero: HeroConfig) -> None:
    recorded = (ckpt_adapter.get(KEY_ADAPTER_BASE) or {})
    want, got = recorded.get("weights_sha256"), identity["weights_sha256"]
    if want != got:
        raise AdapterError(
            f"checkpoint {checkpoint.name} is an adapter for the base {recorded.get('base_model') or 'embedded default'}"
            f" at {recorded.get('path')} (weights SHA-256 {str(want)[:12]}...), but hero.base_model "
            f"{hero.base_model!r} resolves to {identity['path']} (weights SHA-256 {got[:12]}...): an adapter "
            "only fits the weights it was trained on. Point hero.base_model back to that base, or use a new "
            "hero.name to train a new adapter on this one")


def _setting_notes(checkpoint: Path, ckpt_adapter: dict, t: TrainingConfig, kept: dict) -> list[tuple[str, str]]:
    notes = []
    if ckpt_adapter.get(KEY_ADAPTER_TYPE) != t.adapter:
        notes.append(("adapter_type_changed", f"checkpoint {checkpoint.name} trained a "
                      f"{ckpt_adapter.get(KEY_ADAPTER_TYPE)} adapter; going on as {t.adapter} (same adapter "
                      "weights, the base loaded as training.adapter says)"))
    wanted = {"r": t.lora.r, "alpha": float(t.lora.alpha), "dropout": float(t.lora.dropout)}
    if t.lora.target_modules is not None:
        wanted["target_modules"] = sorted(t.lora.target_modules)
    differ = {k: (kept[k], v) for k, v in wanted.items() if kept.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {a} (config: {b})" for k, (a, b) in differ.items())
        notes.append(("adapter_settings_kept", f"checkpoint {checkpoint.name} has adapter settings {what}: "
                      "keeping the checkpoint's (its weights and optimizer state depend on them); use a new "
                      "hero.name to train an adapter with the new settings"))
    return notes


# --- loading for inference -----------------------------------------------------------------------------
def check_adapter_base(adapter_dir: Path | str, base_path: Path | str) -> None:
    """Raise :class:`AdapterError` when the adapter folder records a base weights SHA-256 (checkpoints of
    this engine do) and the weights in ``base_path`` hash differently. No record: nothing to check."""
    folder = Path(adapter_dir)
    base, _ = _recorded_base(folder)
    if not base.get("weights_sha256"):
        return
    cache = folder.parent.parent / BASE_HASH_CACHE
    got = weights_sha256(base_path, cache if cache.is_file() else None)
    if got != base["weights_sha256"]:
        raise AdapterError(f"{folder} is an adapter for weights with SHA-256 {base['weights_sha256'][:12]}..., "
                           f"but {base_path} holds weights with SHA-256 {got[:12]}...: restore the base it was "
                           "trained on")


def _recorded_base(folder: Path) -> tuple[dict, str | None]:
    """``(base identity recorded by this engine or {}, adapter_config.json's base_model_name_or_path)``."""
    try:
        base = (read_checkpoint_info(folder).get(KEY_ADAPTER) or {}).get(KEY_ADAPTER_BASE) or {}
    except CheckpointError:
        base = {}
    try:
        named = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    return base, named if isinstance(named, str) else None


def adapter_base_path(adapter_dir: Path | str) -> str | None:
    """The base model folder an adapter folder (checkpoint, version, backup) belongs to, or None when none
    of these holds a model: for the embedded default hero, ``models/<hero>/base`` beside the checkpoint or
    version first (the realm's own, also in a moved or copied realm); the path recorded at training time;
    ``adapter_config.json``'s ``base_model_name_or_path``. Not verified: :func:`check_adapter_base` does
    that."""
    folder = Path(adapter_dir)
    base, named = _recorded_base(folder)
    candidates = [str(folder.parent.parent / "base") if base.get("newborn") else None, base.get("path"), named]
    return next((c for c in candidates if isinstance(c, str) and c and (Path(c) / "config.json").is_file()), None)


def load_merged(path: Path | str, hero_config: HeroConfig, dtype):
    """An adapter folder (checkpoint, version or backup) as a plain model: its base, from the recorded path
    (else ``adapter_config.json``'s ``base_model_name_or_path``) with the weights hash verified when
    recorded, plus the adapter, merged (PEFT ``merge_and_unload``), in ``dtype``.

    Raises :class:`AdapterError` when the base is gone or differs, :class:`core.hero.HeroError` when a
    model does not load.
    """
    from peft import PeftModel

    folder = Path(path)
    base_path = adapter_base_path(folder)
    if base_path is None:
        base, named = _recorded_base(folder)
        raise AdapterError(f"{folder} is an adapter for the base model at {base.get('path') or named}, which is "
                           "not there any more: restore that folder to use this checkpoint")
    check_adapter_base(folder, base_path)
    model = load_model(base_path, hero_config, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PEFT_NOISE, category=FutureWarning)
            merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except Exception as exc:
        raise AdapterError(f"cannot apply the adapter in {folder}: {type(exc).__name__}: {exc}") from exc
    return merged
