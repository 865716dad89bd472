"""Training memory before it fails: the peak memory of the current config, from the model's shape alone.

Torch-free (the Tavern's System page imports it): the model's shape comes from its ``config.json`` and the
headers of its ``*.safetensors`` files (parameter counts and the linear layers' shapes, read without
loading a tensor), or from :data:`core.hero.HERO_SIZES` for the embedded default before it exists.

**The estimate** (:func:`estimate`), in bytes, for ``T = micro_batch_size x max_length`` tokens per forward
pass, ``P`` parameters, ``P_t`` trainable ones (all of them, or the adapter's: ``r (in + out)`` per adapted
linear layer), ``L`` layers, hidden size ``h``, MLP size ``I``, ``q = heads x head_dim``,
``kv = kv_heads x head_dim``, vocabulary ``V``, activation width ``b`` (4 in fp32, 2 under bf16/fp16
autocast):

- weights: full ``4 P`` (fp32 master weights; under autocast + ``2 P_lin`` for the half copies of the linear
  weights that autograd keeps for the backward); LoRA ``w P + 4 P_t`` with ``w`` 4 on a CPU, 2 on a GPU in
  bf16/fp16 (a frozen base needs no fp32 copy); QLoRA ``0.516 P_lin + 2 (P - P_lin) + 4 P_t`` (NF4: 4 bits
  + double-quantized absmax, 8 bits per 64 weights + 32 bits per 256 blocks = 4.127 bits; the other
  weights in bf16, see :mod:`core.adapters`);
- gradients ``4 P_t``; optimizer (AdamW: two fp32 moments) ``8 P_t``;
- activations, the tensors autograd saves, per token and layer, counted the way Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198, sec. 4.1: ``sbh
  (34 + 5 a s / h)`` bytes per layer for GPT in 16 bits) count them, for our block (pre-RMSNorm, GQA, RoPE,
  SwiGLU, no dropout) and our attention (SDPA's flash/memory-efficient kernels keep no ``s x s`` scores,
  so the ``5 a s / h`` term is gone; packed examples are separate causal segments or a boolean 4D mask of
  ``micro_batch x max_length^2`` bytes on the GPU path):

  ``full = 4 (2 h) + b (h + h) + [qk-norm: 4 (2 q + 2 kv)] + b (2 q + 2 kv + 4 I)`` (residual input and
  normalised stream in fp32 twice, the two projection inputs, Qwen3's q/k-norm inputs and outputs, q and k
  after RoPE, v, the attention output, and gate, up, SiLU(gate), their product); with a frozen base (LoRA)
  the norm outputs are not kept (``2 h`` and the normalised q/k less) and each adapted layer keeps its
  ``r`` outputs of ``A``; dropout on the adapter keeps its input copy and mask per adapted layer. The
  final norm and the LM head keep ``3 h`` (1 with a frozen head) and the loss ``T V (4 + 4 + 4)`` at the
  start of the backward (the fp32 log-softmax, the gradient of the log-probabilities and of the logits; +
  ``b`` for the half logits under autocast). The backward needs one more layer's worth of working memory.
- gradient checkpointing keeps only each layer's input (``4 h`` per token and layer) plus the one layer
  being recomputed in the backward, and the loss;
- the peak: weights + optimizer + (gradients + activations) when the step accumulates several
  micro-batches, else + max(gradients, activations) (the backward frees activations as gradients appear).

- on a CPU, + the freed blocks glibc's allocator keeps (:data:`CPU_ALLOCATOR_RETENTION`, measured):
  peak RSS is the live tensors plus those.

Measured on this CPU (``bench/memory_estimate.py``, the table is in the README): the formula above is
within -7..+16% of the live malloc peak (glibc ``mallinfo2``) for every hero here, full and LoRA, without
checkpointing and with it, except LoRA with checkpointing on ``small`` (+54%: an over-estimate); the total
is within +-25% of peak RSS for 18 of the 20 configurations. The two others are the smallest (stories260K,
4 x 256 tokens): a fixed ~100 MB the process pays on a CPU once it trains, not modelled, dominates there. The GPU figures are the
same formulas with the autocast widths, checked by ``bench/gpu_check.py`` on a GPU (CUDA's caching
allocator slack is not modelled). Not included: the CUDA context (~0.5 GiB) and the Python/torch process
itself (~0.35 GB RSS on a CPU).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GIB = 1024 ** 3
NF4_BYTES_PER_PARAMETER = 4.127 / 8
CPU_ALLOCATOR_RETENTION = {  # (adapter, gradient checkpointing) -> share of plain activations + loss
    (False, False): 0.18, (True, False): 0.62, (False, True): 0.47, (True, True): 0.88}
"""Freed blocks glibc's malloc keeps during a step on a CPU, as a share of the non-checkpointed activations
and loss: fitted (the median over the heroes) to peak RSS minus the formulas' live-tensor peak in
``bench/memory_estimate.py`` (8 x 512-token micro-batches, torch 2.13, glibc 2.36), and checked on other
micro-batch shapes (the held-out rows of that bench). LoRA keeps more: PEFT's adapter allocates and frees
two more tensors of each adapted layer's output per forward; with checkpointing the backward's
recomputation churns the heap again, so on a CPU checkpointing saves much less RSS than live memory."""
MAX_HEADER_BYTES = 100 * 1024 * 1024


class MemoryEstimateError(ValueError):
    """The model's shape cannot be read (no config.json, unknown layout); the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a decoder-only model. ``block_linears``: per linear layer name
    inside the repeated blocks (``q_proj``...), its ``(out, in)`` shapes over all layers."""

    parameters: int
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    qk_norm: bool
    block_linears: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    source: str = ""

    @property
    def linear_parameters(self) -> int:
        """Parameters in the blocks' linear layers (what QLoRA quantizes)."""
        return sum(o * i for shapes in self.block_linears.values() for o, i in shapes)

    def lora_parameters(self, r: int, targets: list[str] | None) -> int:
        """Trainable parameters of a rank-``r`` LoRA on ``targets`` (None: every block linear)."""
        names = self.block_linears if targets is None else [t for t in targets if t in self.block_linears]
        return sum(r * (o + i) for n in names for o, i in self.block_linears[n])

    def targets(self, targets: list[str] | None) -> list[str]:
        return sorted(self.block_linears if targets is None else [t for t in targets if t in self.block_linears])


def _get(cfg: dict, *names: str, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def shape_from_config(cfg: dict[str, Any], source: str = "config") -> ModelShape:
    """A Llama/Qwen-style shape from a ``config.json`` dict alone (parameters counted from the formulas:
    embeddings, per layer q/k/v/o and gate/up/down projections, norms; the LM head unless tied)."""
    h = int(_get(cfg, "hidden_size", "n_embd", "d_model", default=0))
    layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0))
    heads = int(_get(cfg, "num_attention_heads", "n_head", default=0))
    if not (h and layers and heads):
        raise MemoryEstimateError(f"{source}: no hidden_size / num_hidden_layers / num_attention_heads")
    kv = int(_get(cfg, "num_key_value_heads", default=heads))
    d = int(_get(cfg, "head_dim", default=h // heads))
    inter = int(_get(cfg, "intermediate_size", "n_inner", default=4 * h))
    vocab = int(_get(cfg, "vocab_size", default=0))
    qk_norm = str(cfg.get("model_type", "")).startswith("qwen3")
    per_layer = {"q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, heads * d),
                 "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    linears = {n: [s] * layers for n, s in per_layer.items()}
    norms = layers * (2 * h + (2 * d if qk_norm else 0)) + h
    params = sum(o * i for o, i in per_layer.values()) * layers + vocab * h + norms
    if not cfg.get("tie_word_embeddings", True):
        params += vocab * h
    return ModelShape(params, layers, h, inter, heads, kv, d, vocab, qk_norm, linears, source)


def _safetensors_headers(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.safetensors")):
        if f.name.startswith("adapter_"):
            continue
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > MAX_HEADER_BYTES:
                raise MemoryEstimateError(f"{f}: implausible safetensors header ({n} bytes)")
            out.append(json.loads(fh.read(n)))
    return out


def shape_from_folder(folder: Path | str) -> ModelShape:
    """The shape of the model in a Hugging Face folder: sizes from ``config.json``, parameters and the
    blocks' linear layers from the safetensors headers (exact for any architecture); formulas when the
    weights are not safetensors. Raises :class:`MemoryEstimateError`."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MemoryEstimateError(f"{folder}: cannot read config.json ({exc})") from None
    shape = shape_from_config(cfg, str(folder))
    try:
        headers = _safetensors_headers(folder)
    except (OSError, ValueError, struct.error) as exc:
        raise MemoryEstimateError(f"{folder}: unreadable safetensors header ({exc})") from None
    if not headers:
        return shape
    params, linears, qk_norm = 0, {}, False
    for header in headers:
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            dims = [int(x) for x in meta.get("shape", [])]
            n = 1
            for x in dims:
                n *= x
            params += n
            parts = name.split(".")
            qk_norm = qk_norm or "q_norm" in parts
            if len(dims) == 2 and parts[-1] == "weight" and any(p.isdigit() for p in parts[:-2]):
                linears.setdefault(parts[-2], []).append((dims[0], dims[1]))
    return ModelShape(params, shape.layers, shape.hidden_size, shape.intermediate_size, shape.heads,
                      shape.kv_heads, shape.head_dim, shape.vocab_size, qk_norm or shape.qk_norm,
                      {k: v for k, v in linears.items() if "embed" not in k}, str(folder))


def shape_for_realm(realm, config) -> ModelShape:
    """The shape of the realm's base model (``hero.base_model``, else the embedded default, created or not).
    Creates nothing. Raises :class:`MemoryEstimateError` or :class:`core.hero.HeroError`."""
    from core.hero import BYTE_VOCAB_SIZE, HERO_SIZES, resolve_model_source

    source, newborn = resolve_model_source(realm, config.hero, create=False)
    if newborn and not (Path(source) / "config.json").is_file():
        cfg = {**HERO_SIZES[config.hero.default_size], "vocab_size": BYTE_VOCAB_SIZE, "model_type": "qwen3"}
        return shape_from_config(cfg, f"embedded default hero ({config.hero.default_size})")
    return shape_from_folder(source)


# --- the estimate ----------------------------------------------------------------------------------------
def training_precision(mixed_precision: str, device: str, bf16_supported: bool = True) -> str:
    """``training.mixed_precision`` -> ``no|bf16|fp16`` as the engine resolves it (fp32 on a CPU)."""
    if device != "cuda":
        return "no"
    if mixed_precision == "auto":
        return "bf16" if bf16_supported else "no"
    return mixed_precision


@dataclass
class MemoryEstimate:
    """Bytes of each part and the peak (``total_bytes``); ``activations_bytes`` is for the configured
    gradient checkpointing, ``activations_plain_bytes``/``activations_checkpointed_bytes`` for both;
    ``allocator_bytes``: what the CPU allocator keeps beyond the live tensors (0 on CUDA);
    ``total_bytes - allocator_bytes`` is the live-tensor peak."""

    device: str
    precision: str
    adapter: str | None
    gradient_checkpointing: bool
    tokens_per_micro_batch: int
    parameters: int
    trainable_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_plain_bytes: int
    activations_checkpointed_bytes: int
    loss_bytes: int
    allocator_bytes: int
    total_bytes: int
    source: str = ""
    other_models_bytes: int = 0
    other_models: str = ""

    def with_other_models(self, n_bytes: int, what: str) -> MemoryEstimate:
        """This estimate plus ``n_bytes`` of models held beside the hero (``what``: e.g. "the teacher")."""
        return replace(self, other_models_bytes=self.other_models_bytes + int(n_bytes),
                       total_bytes=self.total_bytes + int(n_bytes),
                       other_models=f"{self.other_models}; {what}" if self.other_models else what)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """A short human-readable breakdown (GiB)."""
        def g(n: int) -> str:
            return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"
        mode = {"lora": "LoRA", "qlora": "QLoRA"}.get(self.adapter or "", "full fine-tuning")
        other = self.activations_checkpointed_bytes if not self.gradient_checkpointing else self.activations_plain_bytes
        return [f"training memory estimate ({mode}, {self.device}, precision {self.precision}, "
                f"{self.tokens_per_micro_batch:,} tokens per micro-batch): {g(self.total_bytes)}",
                f"  weights {g(self.weights_bytes)}, gradients {g(self.gradients_bytes)}, optimizer "
                f"{g(self.optimizer_bytes)} ({self.trainable_parameters:,} of {self.parameters:,} parameters "
                "trained)",
                f"  activations {g(self.activations_bytes)} "
                f"(gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}; "
                f"{'off' if self.gradient_checkpointing else 'on'}: {g(other)}), loss and logits "
                f"{g(self.loss_bytes)}" + (f", freed blocks the CPU allocator keeps {g(self.allocator_bytes)}"
                                           if self.allocator_bytes else "")] + (
                    [f"  other models held beside the hero {g(self.other_models_bytes)} ({self.other_models})"]
                    if self.other_models_bytes else [])


def _layer_activation_bytes(s: ModelShape, b: int, frozen: bool, targets: list[str], r: int,
                            dropout: float) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module doc)."""
    h, q, kv, inter = s.hidden_size, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate_size
    small = 4 * (2 * s.heads + s.kv_heads)  # RMSNorm and attention log-sum-exp scalars
    if not frozen:  # residual input and normalised stream (fp32) twice, the two projection inputs
        norm = 4 * 4 * h + b * 2 * h + (4 * 2 * (q + kv) if s.qk_norm else 0)
        return norm + b * (2 * q + 2 * kv + 4 * inter) + small
    norm = 4 * 2 * h + b * 2 * h + (4 * (q + kv) if s.qk_norm else 0)  # frozen norms keep no output
    extra = 4 * r * sum(len(s.block_linears[t]) for t in targets) / max(s.layers, 1)
    if dropout > 0:
        extra += (b + 1) * sum(i for t in targets for _, i in s.block_linears[t]) / max(s.layers, 1)
    return norm + b * (2 * q + 2 * kv + 4 * inter) + small + extra


def estimate(shape: ModelShape, training, *, device: str = "cpu", bf16_supported: bool = True) -> MemoryEstimate:
    """Peak training memory of ``training`` (a :class:`core.config.TrainingConfig`) for ``shape`` on
    ``device`` (``cpu`` or ``cuda``), in bytes, by the formulas of the module doc."""
    precision = training_precision(training.mixed_precision, device, bf16_supported)
    b = 4 if precision == "no" else 2
    adapter = training.adapter
    frozen = adapter is not None
    P, P_lin = shape.parameters, shape.linear_parameters
    targets = shape.targets(training.lora.target_modules) if frozen else []
    P_t = shape.lora_parameters(training.lora.r, targets) if frozen else P
    if adapter is None:
        weights = 4 * P + (2 * (P_lin + shape.vocab_size * shape.hidden_size) if b == 2 else 0)
    elif adapter == "lora":
        weights = (4 if device != "cuda" or b == 4 else 2) * P + 4 * P_t
    else:
        weights = int(NF4_BYTES_PER_PARAMETER * P_lin) + (2 if b == 2 else 4) * (P - P_lin) + 4 * P_t
    T = training.micro_batch_size * training.max_length
    layer = _layer_activation_bytes(shape, b, frozen, targets, training.lora.r, training.lora.dropout)
    head = (4 if frozen else 8 + b) * shape.hidden_size
    loss = T * shape.vocab_size * (12 + (b if b != 4 else 0))
    mask = training.micro_batch_size * training.max_length ** 2 if device == "cuda" and training.packing else 0
    plain = int(T * (shape.layers * layer + head) + T * layer) + mask
    checkpointed = int(T * (shape.layers * 4 * shape.hidden_size + head) + T * layer) + mask
    activations = checkpointed if training.gradient_checkpointing else plain
    gradients, optimizer = 4 * P_t, 8 * P_t
    moving = gradients + activations + loss if training.gradient_accumulation_steps > 1 else \
        max(gradients, activations + loss)
    allocator = 0
    if device != "cuda":
        allocator = int(CPU_ALLOCATOR_RETENTION[(frozen, training.gradient_checkpointing)] * (plain + loss))
    total = int(weights + optimizer + moving + allocator)
    return MemoryEstimate(device, precision, adapter, training.gradient_checkpointing, T, P, P_t, int(weights),
                          gradients, optimizer, activations, plain, checkpointed, int(loss), allocator, total,
                          shape.source)


def estimate_for_realm(realm, config, device: str = "cpu", bf16_supported: bool = True) -> MemoryEstimate:
    """:func:`estimate` for the realm's base model and config."""
    return estimate(shape_for_realm(realm, config), config.training, device=device, bf16_supported=bf16_supported)


def available_bytes(device: str) -> int:
    """Memory this process could use on ``device``: on CUDA the free memory plus what torch already holds
    (``mem_get_info`` + ``memory_reserved``; imports torch); on a CPU the available RAM plus this process's
    RSS (psutil)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())
    import psutil

    return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)


def fit_problem(est: MemoryEstimate, available: int) -> str | None:
    """None when ``est`` fits in ``available`` bytes, else a sentence with the numbers and what to change."""
    if est.total_bytes <= available:
        return None
    tips = []
    if not est.gradient_checkpointing:
        tips.append(f"training.gradient_checkpointing true (activations {est.activations_bytes / GIB:.2f} -> "
                    f"{est.activations_checkpointed_bytes / GIB:.2f} GiB)")
    tips.append("a smaller training.micro_batch_size (more gradient_accumulation_steps keep the step the same)")
    if est.adapter is None:
        tips.append('training.adapter "lora" (or "qlora" on a GPU)')
    where = "GPU memory" if est.device == "cuda" else "RAM"
    others = f" (with {est.other_models} {est.other_models_bytes / GIB:.2f} GiB)" if est.other_models_bytes else ""
    return (f"the training memory estimate {est.total_bytes / GIB:.2f} GiB{others} exceeds the {where} available "
            f"({available / GIB:.2f} GiB): expect {'an out-of-memory halving of the micro-batch' if est.device == 'cuda' else 'swapping or the OOM killer'}; "
            f"consider {'; '.join(tips)}, or a preset (`python -m training init DIR --preset ...`)")
