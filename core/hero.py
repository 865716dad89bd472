"""The hero: the one model a realm trains. Where its weights come from, and the embedded default.

Sources, in the order the engine tries them (see :class:`core.engine.Engine`):

1. the latest loadable checkpoint of the hero (``models/<hero>/checkpoints/step-*``);
2. ``hero.base_model``: a local Hugging Face model folder, or a hub id resolved from the local cache
   only (``local_files_only=True``: never a download, never a hang without network);
3. the embedded default hero at ``models/<hero>/base``, created on first use: a random-init Qwen3
   (:class:`transformers.Qwen3Config`) with a byte-level tokenizer built in code (256 byte tokens,
   ids 0-255 equal to the byte values, plus 4 special tokens) and the ChatML chat template.

A tokenizer without a chat template gets :data:`DEFAULT_CHAT_TEMPLATE` (ChatML,
``<|im_start|>role\\ncontent<|im_end|>\\n``). With a tokenizer that lacks ``<|im_start|>``/``<|im_end|>``
as tokens (e.g. stories260K) those markers are tokenized as plain text: it works, at a few extra tokens
per turn; set ``hero.chat_template`` to use the model's own conventions instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from core.config import HeroConfig
from core.realm import Realm

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, the documented default for tokenizers without a chat template."""

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
BYTE_SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
BYTE_VOCAB_SIZE = 256 + len(BYTE_SPECIAL_TOKENS)  # 260
BASE_DIRNAME = "base"
EMBEDDED_TOKENIZER = "embedded:byte-level"
"""A tokenizer source meaning :func:`build_byte_tokenizer` (the default hero's, before it exists on disk)."""

_COMMON = dict(vocab_size=BYTE_VOCAB_SIZE, tie_word_embeddings=True, max_position_embeddings=4096,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
               attention_dropout=0.0, initializer_range=0.02)
HERO_SIZES: dict[str, dict[str, Any]] = {
    # name: Qwen3Config kwargs. Parameters (tied embeddings, vocab 260): nano ~0.39M, micro ~2.5M,
    # tiny ~9.9M, small ~39M.
    "nano": dict(_COMMON, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "micro": dict(_COMMON, hidden_size=128, intermediate_size=512, num_hidden_layers=10, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32),
    "tiny": dict(_COMMON, hidden_size=256, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32),
    "small": dict(_COMMON, hidden_size=512, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}

NEWBORN_HINT = ("This is a newborn hero: random weights and a byte-level tokenizer, so it learns from scratch. "
                "To fine-tune a real model set hero.base_model in config.json to a local Hugging Face model "
                "folder (or a hub id already in the local cache), or run "
                "`python -m training init DIR --base-model PATH_OR_HUB_ID`.")


class HeroError(RuntimeError):
    """Raised when the hero's model or tokenizer cannot be found, created or loaded."""


# --- the embedded default ---------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_byte_tokenizer(model_max_length: int = 4096):
    """A byte-level ``PreTrainedTokenizerFast``: token id = byte value (0-255), then ``<|endoftext|>`` (256,
    EOS), ``<|im_start|>`` (257), ``<|im_end|>`` (258), ``<|pad|>`` (259); ChatML chat template.

    Any UTF-8 text round-trips (``decode(encode(s)) == s``). No merges: one token per byte.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN], chat_template=DEFAULT_CHAT_TEMPLATE,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )


def create_default_hero(dest: Path | str, size: str = "micro", seed: int = 42) -> Path:
    """Write a random-init Qwen3 hero of ``size`` (a key of :data:`HERO_SIZES`) to the folder ``dest``:
    ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32) and the byte-level tokenizer.

    Written into a temporary sibling folder and renamed, so ``dest`` is complete or absent. The global
    RNG is left untouched (weights come from a forked RNG seeded with ``seed``). Returns ``dest``.
    Raises :class:`HeroError` for an unknown size or when ``dest`` already exists.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if size not in HERO_SIZES:
        raise HeroError(f"unknown hero size {size!r}; choose one of {', '.join(HERO_SIZES)}")
    dest = Path(dest)
    if dest.exists():
        raise HeroError(f"{dest} already exists; refusing to overwrite a hero")
    tokenizer = build_byte_tokenizer(HERO_SIZES[size]["max_position_embeddings"])
    config = Qwen3Config(**HERO_SIZES[size], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hero.json").write_text(json.dumps({"size": size, "seed": seed, "newborn": True}, indent=2) + "\n")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def default_hero_dir(realm: Realm, hero_config: HeroConfig) -> Path:
    """Where the embedded default hero of this realm lives: ``models/<hero>/base``."""
    return realm.hero_dir(hero_config.name) / BASE_DIRNAME


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


# --- resolution and loading -------------------------------------------------------------------------
def resolve_model_source(realm: Realm, hero_config: HeroConfig, *, create: bool = True,
                         seed: int = 42) -> tuple[str, bool]:
    """Where the hero's starting weights come from (checkpoints aside): ``(local folder, newborn)``.

    - ``base_model`` null: the embedded default at ``models/<hero>/base`` (created with
      ``hero.default_size`` and ``seed`` when missing and ``create``); newborn is True.
    - a local folder (absolute, or relative to the realm): must hold ``config.json``.
    - otherwise a hub id, looked up in the local Hugging Face cache only (no network).

    Raises :class:`HeroError` with the fix when the folder or cached model is absent.
    """
    if hero_config.base_model is None:
        dest = default_hero_dir(realm, hero_config)
        if not _is_model_folder(dest) and create:
            create_default_hero(dest, hero_config.default_size, seed)
        return str(dest), True
    source = realm.resolve_base_model(hero_config.base_model)
    path = Path(source)
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        if not path.exists():
            raise HeroError(f"hero.base_model {hero_config.base_model!r}: folder {path} does not exist")
        if not _is_model_folder(path):
            raise HeroError(f"hero.base_model {hero_config.base_model!r}: {path} has no config.json; it must "
                            "be a Hugging Face model folder (save_pretrained output)")
        return str(path), False
    return _from_hub_cache(source, realm), False


def _from_hub_cache(repo_id: str, realm: Realm, setting: str = "hero.base_model") -> str:
    """The local snapshot folder of hub id ``repo_id`` (``local_files_only``: never a download). Raises
    :class:`HeroError` naming ``setting`` (the config key that named it) with the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except HFValidationError as exc:
        raise HeroError(f"{setting} {repo_id!r} is neither an existing folder nor a valid hub id: "
                        f"{exc}") from None
    except Exception as exc:  # LocalEntryNotFoundError and friends: not in the cache
        raise HeroError(
            f"{setting} {repo_id!r} is neither a folder (looked in {realm.root}) nor a model in the local "
            "Hugging Face cache, and downloads are off. "
            f"On a machine with network run `hf download {repo_id}` (or save the model to a folder and set "
            f"{setting} to that folder). ({type(exc).__name__})") from None


def resolve_tokenizer_source(realm: Realm, config) -> str:
    """The folder whose tokenizer the hero trains with, without creating anything (for validation and
    the doctor): the newest checkpoint holding a tokenizer, else ``hero.base_model`` (see
    :func:`resolve_model_source`), else the default hero's folder, else :data:`EMBEDDED_TOKENIZER` (the
    default hero is not created yet; its tokenizer is built in code). ``config``: a
    :class:`core.config.RealmConfig`. Raises :class:`HeroError` like :func:`resolve_model_source`.
    """
    from core.checkpoint_layout import list_checkpoints

    for path in reversed(list_checkpoints(realm.checkpoints_dir(config.hero.name))):
        if (path / "tokenizer_config.json").is_file():
            return str(path)
    source, newborn = resolve_model_source(realm, config.hero, create=False)
    if newborn and not _is_model_folder(Path(source)):
        return EMBEDDED_TOKENIZER
    return source


def load_tokenizer(source: str | Path, hero_config: HeroConfig):
    """Load the tokenizer from a local folder (or :data:`EMBEDDED_TOKENIZER`), ready for training.

    - ``hero.chat_template`` overrides the tokenizer's template; without either, :data:`DEFAULT_CHAT_TEMPLATE`.
    - A pad token is ensured (the EOS token, else the UNK token, else token id 0): pads are masked
      out of attention and loss, so its identity does not matter.

    Raises :class:`HeroError` when the folder holds no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        if str(source) == EMBEDDED_TOKENIZER:
            tokenizer = build_byte_tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True,
                                                      trust_remote_code=hero_config.trust_remote_code)
    except Exception as exc:
        raise HeroError(f"cannot load the tokenizer from {source}: {type(exc).__name__}: {exc}") from exc
    if hero_config.chat_template is not None:
        tokenizer.chat_template = hero_config.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
        tokenizer.pad_token = fallback
    return tokenizer


def load_model(source: str | Path, hero_config: HeroConfig, dtype=None, **kwargs):
    """Load a causal LM from a local folder with weights in ``dtype`` (a ``torch.dtype``; None: fp32, the
    master weights for training). ``kwargs`` go to ``from_pretrained`` (e.g. ``quantization_config``).

    An adapter checkpoint (PEFT's ``adapter_config.json`` instead of a whole model) is loaded as its base
    model with the adapter merged in, ready for inference (:func:`core.adapters.load_merged`: the oracle
    and ``eval`` read adapter checkpoints through this). ``trust_remote_code`` comes from the hero config.
    Raises :class:`HeroError` when loading fails (:class:`core.adapters.AdapterError` for a wrong base).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from core.checkpoint_layout import is_adapter_checkpoint

    dtype = torch.float32 if dtype is None else dtype
    if is_adapter_checkpoint(source):
        from core.adapters import load_merged

        return load_merged(source, hero_config, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True,
                                                     trust_remote_code=hero_config.trust_remote_code, **kwargs)
    except Exception as exc:
        raise HeroError(f"cannot load the model from {source}: {type(exc).__name__}: {exc}") from exc
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (tied weights counted once); a 4-bit bitsandbytes weight counts its unpacked
    size (its storage holds two values per byte)."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None and hasattr(state, "shape") else p.numel()
    return total


def describe_model(model) -> dict[str, Any]:
    """``{"architecture": str, "parameters": int, "trainable_parameters": int}`` (tied weights counted
    once; with an adapter, parameters include the adapter's and trainable_parameters are the adapter's)."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {"architecture": archs[0], "parameters": count_parameters(model),
            "trainable_parameters": count_parameters(model, trainable_only=True)}
