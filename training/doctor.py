"""``python -m training doctor``: each check says what it found and, when it fails, how to fix it."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

from core.config import RealmConfig
from core.realm import Realm

MIN_FREE_BYTES = 2 * 1024**3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(realm: Realm, config: RealmConfig) -> list[Check]:
    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0],
                    "install Python 3.10 or newer")]
    try:
        import torch

        checks.append(Check("torch", True, f"{torch.__version__}"))
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            checks.append(Check("gpu", True, f"{torch.cuda.device_count()} CUDA device(s): {names}; bf16 "
                                f"{'supported' if torch.cuda.is_bf16_supported() else 'not supported'}"))
        else:
            hint = ("an NVIDIA GPU is present but this torch is a CPU build: reinstall torch with CUDA "
                    "(rm -rf .venv && make start)") if shutil.which("nvidia-smi") else ""
            checks.append(Check("gpu", not hint, "none: training runs on the CPU in fp32 (slow but real)",
                                hint))
    except ImportError as exc:
        checks.append(Check("torch", False, f"not importable: {exc}", "run `make start` (creates .venv)"))
    usage = shutil.disk_usage(realm.root if realm.root.exists() else realm.root.parent)
    checks.append(Check("disk", usage.free >= MIN_FREE_BYTES, f"{usage.free / 1024**3:.1f} GB free of "
                        f"{usage.total / 1024**3:.1f} GB", "free space: checkpoints need room (see vault prune)"))
    checks.append(Check("config", True, f"{realm.config_path} valid" if realm.config_path.exists()
                        else "no config.json: defaults in use"))
    for folder in (realm.inbox, realm.queue, realm.models):
        ok = folder.is_dir() and os.access(folder, os.W_OK)
        checks.append(Check(f"folder {folder.name}/", ok, "writable" if ok else "missing or not writable",
                            f"run `python -m training init {realm.root}` or fix permissions"))
    checks.append(_model_check(realm, config))
    checks += _training_checks(realm, config)
    return checks


def _training_checks(realm: Realm, config: RealmConfig) -> list[Check]:
    """Whether this machine can train the config (QLoRA needs CUDA and bitsandbytes) and whether the
    training memory estimate (core.memory) fits the memory available here."""
    from core.adapters import environment_problems
    from core.memory import available_bytes, estimate_for_realm, fit_problem

    mode = config.training.adapter or "full fine-tuning"
    problems = environment_problems(config.training)
    checks = [Check("adapter", not problems, "; ".join(problems) if problems else f"{mode}: runs here",
                    'set training.adapter to "lora" (or null) here, or train on a machine with a CUDA GPU '
                    "and bitsandbytes")]
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        est = estimate_for_realm(realm, config, device=device)
        available = available_bytes(device)
    except Exception as exc:  # report, never crash the doctor
        return checks + [Check("memory estimate", True, f"not available ({type(exc).__name__}: {exc})")]
    problem = fit_problem(est, available)
    lines = est.lines()
    detail = "\n    ".join([*lines, f"available: {available / 1024 ** 3:.2f} GiB ({'GPU' if device == 'cuda' else 'RAM'})"])
    checks.append(Check("memory estimate", problem is None, detail, problem or ""))
    return checks


def _model_check(realm: Realm, config: RealmConfig) -> Check:
    try:
        from training.hero_tokenizer import hero_tokenizer

        tok = hero_tokenizer(realm, config)
        has_template = bool(getattr(tok, "chat_template", None))
        what = config.hero.base_model or "embedded default hero (newborn, random init)"
        return Check("model and tokenizer", True, f"{what}: tokenizer loads (vocab {len(tok)}), chat template "
                     f"{'present' if has_template else 'missing: default ChatML used'}")
    except Exception as exc:  # report, never crash the doctor
        return Check("model and tokenizer", False, f"{type(exc).__name__}: {exc}",
                     "set hero.base_model to a local Hugging Face model folder, or a hub id already in the "
                     "local cache, or null for the embedded default hero")
