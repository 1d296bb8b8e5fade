"""Compute, time, cost and memory of a LLaMA training run, before anyone rents a GPU.

>>> from tokenmill import plan
>>> e = plan.estimate("llama-65b", tokens=1.4e12, gpu="a100-80gb", gpus=2048, mfu=0.48)
>>> round(e.gpu_hours, -3), round(e.days, 1), round(e.tokens_per_s_per_gpu)
(1034000.0, 21.0, 376)

The formulas, stated once (N = matmul parameters: every weight except the input embedding table;
L layers, d = dim, s = sequence length, V = vocabulary, f = FFN hidden size, kv = KV heads * head_dim):

FLOPs per trained token (model FLOPs, as in PaLM's MFU, Chowdhery et al. 2022, App. B)
    6 N + 6 L s d
  6N: forward 2N, backward 4N (Kaplan et al. 2020). 6 L s d: attention scores QK^T and the weighted sum
  AV cost 2 * 2 s d FLOPs per token per layer forward without a mask (PaLM's 12 L H Q T counts fwd+bwd
  = 3x that); a causal mask halves it (only the lower triangle is computed by flash attention), so
  3 * 2 s d = 6 s d per layer. LoRA fine-tuning skips the 2N weight-gradient FLOPs of the frozen base:
  4 N + 6 L s d + 6 N_lora (QLoRA the same: dequantising the base is memory traffic, not FLOPs).
  Activation checkpointing recomputes the forward (2N + 2 L s d): that is
  extra hardware work, not model FLOPs, so throughput from an assumed MFU is divided by
  (model + recompute) / model.

Time: tokens/s/GPU = MFU * peak FLOP/s / FLOPs-per-token; GPU-hours = tokens / (tokens/s/GPU) / 3600;
days = GPU-hours / GPUs / 24; dollars = GPU-hours * price. Interconnect is not modelled: a measured
throughput (--tokens-per-gpu-s or a train log) already includes it, an assumed MFU should.

Memory per GPU (bytes), the strategy of FSDP / ZeRO-3 (Rajbhandari et al. 2020) with K GPUs:
  weights, gradients: precision bytes * P / K      (bf16-mixed: 2 + 2; fp32: 4 + 4; pure bf16: 2 + 2)
  fp32 master weights: 4 * P / K                    (bf16-mixed only)
  optimizer state: AdamW m and v, 2 * 4 B (fp32; 2 * 2 B in pure bf16); AdamW8bit 2 * 1 B + one fp32
    absmax per 256-value block per state. Mixed-precision AdamW is the ZeRO paper's 16 B/param.
  optimizer transient: torch's foreach AdamW allocates one parameter-sized temporary (sqrt(v)) in the
    state dtype during step(); the fused kernel (fused=True) and AdamW8bit allocate none.
  FSDP buffers (K > 1): the gathered unit being computed plus the prefetched next one, and the
    unsharded gradient of one unit before its reduce-scatter (a unit = one block, the embedding or
    the head).
  activations (Korthikanti et al. 2022 style bookkeeping, written out for LLaMA's block with flash
    attention, fused RMSNorm and SwiGLU (tokenmill.kernels) and no dropout; per token per layer, in
    activation elements):
      attention: norm input d, norm output d, q d, k kv, v kv, attention output d (flash attention
        writes it in (batch, seq, heads, head_dim) layout, so it is also wo's input, no copy)
      SwiGLU MLP: norm input d, norm output d, gate f, up f, w2 input f (the fused SwiGLU saves only
        gate and up and recomputes silu(gate) in backward; unfused autograd also keeps silu(gate), +f)
      = 6 d + 2 kv + 3 f elements, plus fp32: 2 norm rstd + n_heads logsumexp.
      Without flash attention the softmax probabilities add n_heads * s elements (Korthikanti's
      5 a s^2 b counts dropout too; LLaMA has none).
    head: final-norm input and output (2 d) + the fp32 log-probabilities the cross-entropy saves (4 V
      bytes; 0 with the fused linear-cross-entropy kernel).
    Full (per-block) checkpointing keeps only each block's input (d elements per layer).
  backward workspace, on top of the activations, at the larger of two moments: the loss backward
    (incoming and outgoing fp32 logit gradients, 8 V bytes per token) or a block's backward (the
    gradient between blocks, and those of w2's input, gate and up: 2 d + 3 f elements per token, plus
    the recomputed block when checkpointing, minus the head's tensors already freed).
  peak = weights + grads + master + optimizer state + FSDP buffers
         + max(activations + backward workspace, optimizer transient)
  (gradients counted throughout: they persist across micro-batches under gradient accumulation).
  QLoRA (finetune="qlora"; Dettmers et al. 2023, tokenmill.quant): the seven projections of every block are
    stored in NF4, exactly 0.5 B/param + one 8-bit absmax code per 64 values + one fp32 scale per 256
    codes + one fp32 offset per matrix (4.127 bits/param); the embedding, head and norms stay in the weight
    precision; adapters, their gradients, master copy and optimizer state as for LoRA. The 4-bit state is
    module buffers, which FSDP does not shard: each GPU holds all of it (the adapters shard). Each matmul
    dequantises its weight into a dense temporary in the activation dtype (forward, recompute and
    backward alike), so a block's backward adds the largest projection (d x f) on top.
  CPU offload (FSDP2 CPUOffloadPolicy / ZeRO-Offload) keeps weights, gradients, master weights and
  optimizer state in host memory; the GPU holds the FSDP buffers and activations.
  A plan fits when the peak is at most USABLE_FRACTION of the GPU's memory (the rest: CUDA context,
  NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from tokenmill.config import PRESETS, LlamaConfig

USABLE_FRACTION = 0.90
DEFAULT_MFU = 0.40  # a well-tuned FSDP LLaMA run on data-centre GPUs reaches 0.38-0.55 (LLaMA-1: ~0.48)
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, Table 3: 1B -> 20.2B tokens, 67B -> 1.5T
GPUS_PER_NODE = 8
LORA_TARGETS = 7  # wq, wk, wv, wo, w1, w2, w3 in every block
NF4_BLOCK = 64  # values per NF4 absmax (tokenmill.quant.BLOCK)
NF4_ABSMAX_BLOCK = 256  # absmax codes per fp32 scale
ADAMW8BIT_BLOCK = 256


# --------------------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPU:
    """One accelerator. FLOP/s are dense (no 2:4 sparsity) tensor-core peaks with fp32 accumulation."""

    name: str
    bf16_tflops: float
    memory_gb: float  # 10^9 bytes, as vendors state it
    bandwidth_tbs: float
    usd_per_hour: float  # indicative on-demand cloud price; pass your own quote
    fp8_tflops: Optional[float] = None
    tf32_tflops: Optional[float] = None
    aliases: tuple[str, ...] = ()

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    def peak_flops(self, precision: str = "bf16") -> float:
        value = {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "tf32": self.tf32_tflops}[precision]
        if value is None:
            raise ValueError(f"GPU {self.name} has no {precision} tensor-core peak in the table")
        return value * 1e12


# Vendor datasheets / whitepapers (A100, H100, H200, B200, L40S, L4, Ada and Ampere GeForce whitepapers,
# AMD MI300X); prices: typical on-demand $/GPU-hour of public clouds in 2025 (Lambda, RunPod, CoreWeave).
_BUILTIN_GPUS = [
    GPU("A100-40GB", 312, 40, 1.555, 1.29, None, 156, ("a100-40", "a100-40gb-sxm")),
    GPU("A100-80GB", 312, 80, 2.039, 1.79, None, 156, ("a100", "a100-80", "a100-80gb-sxm")),
    GPU("H100-SXM", 989, 80, 3.35, 2.99, 1979, 494, ("h100", "h100-80gb", "h100-sxm5")),
    GPU("H100-PCIe", 756, 80, 2.0, 2.49, 1513, 378, ("h100-pcie-80gb",)),
    GPU("H200", 989, 141, 4.8, 3.79, 1979, 494, ("h200-sxm", "h200-141gb")),
    GPU("B200", 2250, 180, 7.7, 5.99, 4500, 1100, ("b200-sxm",)),
    GPU("L40S", 362, 48, 0.864, 0.99, 733, 183, ()),
    GPU("L4", 121, 24, 0.3, 0.80, 242, 60, ()),
    GPU("RTX-4090", 165, 24, 1.008, 0.69, 330, 83, ("4090", "rtx4090")),
    GPU("RTX-3090", 71, 24, 0.936, 0.46, None, 36, ("3090", "rtx3090")),
    GPU("RTX-5090", 209, 32, 1.792, 0.99, 419, 105, ("5090", "rtx5090")),
    GPU("MI300X", 1307, 192, 5.3, 2.99, 2615, 654, ("amd-mi300x",)),
]
_GPUS: dict[str, GPU] = {}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_gpu(gpu: GPU) -> GPU:
    """Add (or replace) a GPU in the table, under its name and aliases (case and punctuation ignored)."""
    for n in (gpu.name, *gpu.aliases):
        _GPUS[_key(n)] = gpu
    return gpu


for _g in _BUILTIN_GPUS:
    register_gpu(_g)


def gpus() -> list[GPU]:
    """The GPU table, each GPU once, in table order."""
    return list({id(g): g for g in _GPUS.values()}.values())


# CUDA / ROCm device names (torch.cuda.get_device_name, as `tokenmill train` logs them) -> table names;
# first match wins, so the more specific names come first.
_DEVICE_NAMES = (
    ("h100 pcie", "H100-PCIe"),
    ("h100", "H100-SXM"),
    ("h200", "H200"),
    ("b200", "B200"),
    ("a100-sxm4-40gb", "A100-40GB"),
    ("a100-pcie-40gb", "A100-40GB"),
    ("a100", "A100-80GB"),
    ("l40s", "L40S"),
    ("l4", "L4"),
    ("rtx 4090", "RTX-4090"),
    ("rtx 3090", "RTX-3090"),
    ("rtx 5090", "RTX-5090"),
    ("mi300x", "MI300X"),
)


def get_gpu(name: Union[str, GPU]) -> GPU:
    """A GPU by table name or alias (case and punctuation ignored) or by CUDA device name
    ("NVIDIA H100 80GB HBM3")."""
    if isinstance(name, GPU):
        return name
    try:
        return _GPUS[_key(name)]
    except KeyError:
        lower = name.lower()
        for pattern, table_name in _DEVICE_NAMES:
            if pattern in lower:
                return _GPUS[_key(table_name)]
        known = ", ".join(g.name for g in gpus())
        raise ValueError(
            f"unknown GPU {name!r}; known: {known} (add one with plan.register_gpu or a table file)"
        ) from None


def _known_gpu(name: str) -> Optional[GPU]:
    try:
        return get_gpu(name)
    except ValueError:
        return None


def load_gpu_table(path: Union[str, Path]) -> list[GPU]:
    """Register GPUs from a JSON or TOML file: a list (JSON) or `[[gpu]]` tables (TOML) of objects with
    the GPU fields (name, bf16_tflops, memory_gb, bandwidth_tbs, usd_per_hour; optional fp8_tflops,
    tf32_tflops, aliases)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib  # Python >= 3.11

            rows = tomllib.loads(text).get("gpu", [])
        else:
            rows = json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path}: not a valid GPU table: {e}") from None
    if isinstance(rows, dict):
        rows = rows.get("gpu", rows.get("gpus", []))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of GPU objects")
    names = {f.name for f in dataclasses.fields(GPU)}
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        unknown = set(row) - names
        if unknown:
            raise ValueError(f"{path}: entry {i} ({row.get('name')}): unknown fields {sorted(unknown)}")
        try:
            gpu = GPU(**{**row, "aliases": tuple(row.get("aliases", ()))})
            for v in (gpu.bf16_tflops, gpu.memory_gb, gpu.bandwidth_tbs, gpu.usd_per_hour):
                if not (isinstance(v, (int, float)) and v >= 0):
                    raise TypeError(f"numbers must be >= 0, got {v!r}")
        except TypeError as e:
            raise ValueError(f"{path}: entry {i} ({row.get('name')}): {e}") from None
        out.append(register_gpu(gpu))
    return out


# ------------------------------------------------------------------------------------------- models


def shape_for_params(n_params: float, vocab_size: int = 32000) -> LlamaConfig:
    """A LLaMA shape of about `n_params` parameters: head_dim 128 and dim ~ 128 * n_layers, the aspect
    of LLaMA-7B/13B (12 L d^2 + 2 V d parameters)."""
    if n_params <= 0:
        raise ValueError(f"parameter count must be positive, got {n_params}")
    best: Optional[tuple[float, LlamaConfig]] = None
    for layers in range(1, 200):
        dim = max(128, 128 * round(layers * 128 / 128))
        cfg = LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=dim // 128)
        err = abs(cfg.num_params() - n_params)
        if best is None or err < best[0]:
            best = (err, cfg)
    assert best is not None
    return best[1]


def resolve_model(model: Union[str, LlamaConfig, int, float]) -> tuple[str, LlamaConfig, int]:
    """(name, shape, total parameters) of a preset name, a LlamaConfig or a parameter count."""
    if isinstance(model, LlamaConfig):
        return "custom", model, model.num_params()
    if isinstance(model, str):
        if model in PRESETS:
            cfg = PRESETS[model]
            return model, cfg, cfg.num_params()
        try:
            model = parse_count(model)
        except ValueError:
            raise ValueError(f"unknown model {model!r}; presets: {', '.join(sorted(PRESETS))}") from None
    n = int(model)
    cfg = shape_for_params(n)
    return f"{n / 1e9:.3g}B", cfg, n


def parse_count(text: Union[str, int, float]) -> float:
    """'13B', '1.4T', '2e12', 7e9 -> a number."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbtKMBT]?)\s*", text)
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 13e9, 13B, 1.4T)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]


def chinchilla_tokens(n_params: float) -> float:
    """Compute-optimal training tokens, ~20 per parameter (Hoffmann et al. 2022)."""
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def _lora_params(cfg: LlamaConfig, rank: int) -> int:
    d, kv, f = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    per_layer = rank * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)  # wq wo, wk wv, w1 w3 w2
    return cfg.n_layers * per_layer


def _projections(cfg: LlamaConfig) -> list[tuple[int, int]]:
    """(out, in) of the seven projections of one block: wq wk wv wo w1 w3 w2."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    return [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)]


def nf4_bytes(rows: int, cols: int) -> int:
    """Bytes of an NF4 matrix with double-quantised absmax (= tokenmill.quant.state_bytes, tested so)."""
    blocks = -(-rows * cols // NF4_BLOCK)
    return blocks * NF4_BLOCK // 2 + blocks + 4 * -(-blocks // NF4_ABSMAX_BLOCK) + 4


def flops_per_token(
    cfg: LlamaConfig,
    seq_len: int,
    n_params: Optional[int] = None,
    finetune: Optional[str] = None,
    lora_rank: int = 16,
    recompute: bool = False,
) -> float:
    """Model FLOPs per trained token (module docstring); hardware FLOPs with `recompute=True`."""
    total = n_params if n_params is not None else cfg.num_params()
    n = total - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)  # matmul parameters
    attn = 2 * cfg.n_layers * seq_len * cfg.dim  # causal forward
    if finetune in ("lora", "qlora"):
        flops = 4 * n + 3 * attn + 6 * _lora_params(cfg, lora_rank)
    else:
        flops = 6 * n + 3 * attn
    if recompute:
        flops += 2 * n + attn
    return float(flops)


# ------------------------------------------------------------------------------------------- memory

PRECISIONS = {
    # bytes per parameter: weights, gradients, fp32 master copy, each optimizer state element (AdamW)
    "bf16-mixed": (2, 2, 4, 4),
    "bf16": (2, 2, 0, 2),
    "fp32": (4, 4, 0, 4),
}
OPTIMIZERS = ("adamw", "adamw-fused", "adamw8bit")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (and host bytes per GPU when offloading)."""

    weights: float
    grads: float
    master_weights: float
    optimizer: float
    optimizer_transient: float
    fsdp_buffers: float
    activations: float
    backward_workspace: float
    peak: float
    capacity: float
    usable: float
    cpu_offloaded: float

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable


def _activation_bytes(cfg: LlamaConfig, seq_len: int, act: int, flash: bool, lora_rank: Optional[int]) -> int:
    d, kv, f, a = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.n_heads
    per_token_layer = (6 * d + 2 * kv + 3 * f) * act + 2 * 4  # + fp32 rstd of both norms
    # flash: fp32 logsumexp; math attention: the softmax probabilities and the copy of the output for wo
    per_token_layer += a * 4 if flash else (a * seq_len + d) * act
    if lora_rank:
        per_token_layer += LORA_TARGETS * lora_rank * act  # x @ A, the input of B
    return per_token_layer


def memory(
    model: Union[str, LlamaConfig, int, float] = "llama-7b",
    *,
    gpu: Union[str, GPU] = "a100-80gb",
    gpus: int = 1,
    seq_len: Optional[int] = None,
    micro_batch: int = 1,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    checkpointing: bool = False,
    offload: bool = False,
    sharding: str = "fsdp",
    finetune: Optional[str] = None,
    lora_rank: int = 16,
    flash_attention: bool = True,
    fused_loss: bool = False,
) -> Memory:
    """Peak memory per GPU of one training step (formulas in the module docstring)."""
    _, cfg, n_params = resolve_model(model)
    g = get_gpu(gpu)
    seq_len = seq_len or cfg.max_seq_len
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if sharding not in ("fsdp", "ddp"):
        raise ValueError(f"unknown sharding {sharding!r}; choose fsdp or ddp")
    if finetune not in (None, "full", "lora", "qlora"):
        raise ValueError(f"unknown finetune mode {finetune!r}; choose full, lora or qlora")
    if gpus < 1 or micro_batch < 1 or seq_len < 1:
        raise ValueError("gpus, micro_batch and seq_len must be >= 1")
    wb, gb, mb, sb = PRECISIONS[precision]
    lora, qlora = finetune in ("lora", "qlora"), finetune == "qlora"
    trainable = _lora_params(cfg, lora_rank) if lora else n_params
    shard = gpus if (sharding == "fsdp" or offload) else 1
    act = 4 if precision == "fp32" else 2
    dequant = 0.0  # the dense temporary of one dequantised projection (QLoRA)

    if qlora:  # 4-bit projections, replicated (buffers); the rest of the base and the adapters as LoRA
        proj = _projections(cfg)
        n_quant = cfg.n_layers * sum(r * c for r, c in proj)
        base = cfg.n_layers * sum(nf4_bytes(r, c) for r, c in proj) + wb * (n_params - n_quant)
        weights = base + wb * trainable / shard
        dequant = max(r * c for r, c in proj) * act
    else:
        weights = wb * (n_params + (trainable if lora else 0)) / shard
    grads = gb * trainable / shard
    master = mb * trainable / shard
    if optimizer == "adamw8bit":
        state = 2 * (1 + 4 / ADAMW8BIT_BLOCK) * trainable / shard
        transient = 0.0
    else:
        state = 2 * sb * trainable / shard
        transient = (sb * trainable / shard) if optimizer == "adamw" else 0.0

    # FSDP units: each block, the embedding, the head (with the final norm).
    block = (n_params - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) - cfg.dim) / cfg.n_layers
    unit = max(block, cfg.vocab_size * cfg.dim)
    unit_trainable = trainable / cfg.n_layers if lora else unit
    gathered = unit_trainable if qlora else unit  # QLoRA: FSDP gathers only the adapters
    buffers = (2 * gathered * wb + unit_trainable * gb) if shard > 1 or offload else 0.0

    tokens = micro_batch * seq_len
    layer = _activation_bytes(cfg, seq_len, act, flash_attention, lora_rank if lora else None) * tokens
    head = tokens * (2 * cfg.dim * act + 4 + (0 if fused_loss else 4 * cfg.vocab_size))
    stored = cfg.n_layers * (tokens * cfg.dim * act if checkpointing else layer)
    activations = stored + head
    # Backward peaks either at the loss (incoming and outgoing fp32 logit gradients) or inside a block
    # (the gradient between blocks and the largest intermediate ones, plus the recomputed block when
    # checkpointing; the head's tensors are freed by then).
    loss_phase = activations + (0 if fused_loss else 8 * cfg.vocab_size * tokens)
    block_phase: float = (
        stored + (layer if checkpointing else 0) + tokens * (2 * cfg.dim + 3 * cfg.hidden_dim) * act
    )
    block_phase += dequant
    workspace = max(loss_phase, block_phase) - activations
    offloaded = 0.0
    if offload:
        offloaded = weights + grads + master + state
        weights = grads = master = state = transient = 0.0
    static = weights + grads + master + state + buffers
    peak = static + max(activations + workspace, transient)
    return Memory(
        weights=weights,
        grads=grads,
        master_weights=master,
        optimizer=state,
        optimizer_transient=transient,
        fsdp_buffers=buffers,
        activations=activations,
        backward_workspace=workspace,
        peak=peak,
        capacity=g.memory_bytes,
        usable=USABLE_FRACTION * g.memory_bytes,
        cpu_offloaded=offloaded,
    )


# ---------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    model: str
    shape: dict[str, Any]  # shape_of(): dim, n_layers, n_heads, kv_heads, ffn_hidden, vocab_size, tie
    n_params: int
    n_trainable: int
    tokens: float
    seq_len: int
    gpu: str
    gpus: int
    flops_per_token: float
    flops: float
    mfu: float
    tokens_per_s_per_gpu: float
    throughput_source: str
    gpu_hours: float
    days: float
    usd_per_gpu_hour: float
    usd: float
    memory: Memory
    settings: dict[str, Any]
    fits: bool
    fix: Optional[str] = None  # the smallest change that makes it fit, when it does not
    fix_settings: Optional[dict[str, Any]] = None
    fix_memory_peak: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"]["fits"] = self.memory.fits
        d["memory_gb"] = {k: v / 1e9 for k, v in d["memory"].items() if isinstance(v, float)}
        return d


_MEMORY_KEYS = {f.name for f in dataclasses.fields(Memory)} | {"fits"}


def estimate(
    model: Union[str, LlamaConfig, int, float] = "llama-7b",
    tokens: Union[str, float, int] = "chinchilla",
    gpu: Union[str, GPU] = "a100-80gb",
    gpus: int = 1,
    *,
    mfu: Optional[float] = None,
    tokens_per_gpu_s: Optional[float] = None,
    from_log: Union[str, Path, None] = None,
    usd_per_gpu_hour: Optional[float] = None,
    seq_len: Optional[int] = None,
    micro_batch: int = 1,
    precision: str = "bf16-mixed",
    fp8: bool = False,
    optimizer: str = "adamw",
    checkpointing: bool = False,
    offload: bool = False,
    sharding: str = "fsdp",
    finetune: Optional[str] = None,
    lora_rank: int = 16,
    flash_attention: bool = True,
    fused_loss: bool = False,
    suggest_fix: bool = True,
) -> Estimate:
    """Training FLOPs, GPU-hours, days, dollars and per-GPU memory of one run (module docstring).

    Throughput comes from exactly one of: `mfu` (default DEFAULT_MFU), measured `tokens_per_gpu_s`,
    or `from_log` (a `tokenmill train` JSONL log: median tokens/s/GPU after warm-up when the log ran
    this model and GPU, else the log's MFU transferred to this model and GPU).
    """
    name, cfg, n_params = resolve_model(model)
    g = get_gpu(gpu)
    seq_len = int(seq_len or cfg.max_seq_len)
    n_tokens = chinchilla_tokens(n_params) if tokens == "chinchilla" else parse_count(tokens)
    if n_tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    if sum(x is not None for x in (mfu, tokens_per_gpu_s, from_log)) > 1:
        raise ValueError("give at most one of mfu, tokens_per_gpu_s, from_log")
    mem_kw: dict[str, Any] = dict(
        seq_len=seq_len,
        micro_batch=micro_batch,
        precision=precision,
        optimizer=optimizer,
        checkpointing=checkpointing,
        offload=offload,
        sharding=sharding,
        finetune=finetune,
        lora_rank=lora_rank,
        flash_attention=flash_attention,
        fused_loss=fused_loss,
    )
    mem = memory(cfg if name == "custom" else model, gpu=g, gpus=gpus, **mem_kw)

    fpt = flops_per_token(cfg, seq_len, n_params, finetune, lora_rank)
    hw = flops_per_token(cfg, seq_len, n_params, finetune, lora_rank, recompute=checkpointing)
    peak = g.peak_flops("fp8" if fp8 else ("tf32" if precision == "fp32" else "bf16"))
    if from_log is not None:
        log = read_train_log(from_log)
        same = (
            abs(log.n_params - n_params) <= 0.01 * n_params
            and log.seq_len == seq_len
            and log.gpu is not None
            and _known_gpu(log.gpu) is g
        )
        if same:
            tps, source = log.tokens_per_s_per_gpu, f"measured: {from_log} (median of {log.n_steps} steps)"
        else:
            tps = log.mfu * peak / hw
            source = f"MFU {log.mfu:.3f} from {from_log} (other model or GPU)"
        used_mfu = tps * fpt / peak
    elif tokens_per_gpu_s is not None:
        if tokens_per_gpu_s <= 0:
            raise ValueError("tokens_per_gpu_s must be positive")
        tps, source = float(tokens_per_gpu_s), "measured tokens/s/GPU"
        used_mfu = tps * fpt / peak
    else:
        used_mfu = DEFAULT_MFU if mfu is None else float(mfu)
        if not 0 < used_mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {used_mfu}")
        tps = used_mfu * peak / hw  # recompute (checkpointing) costs hardware FLOPs at the same MFU
        source = "assumed MFU" + (" (default)" if mfu is None else "")

    gpu_hours = n_tokens / tps / 3600
    price = g.usd_per_hour if usd_per_gpu_hour is None else float(usd_per_gpu_hour)
    trainable = _lora_params(cfg, lora_rank) if finetune in ("lora", "qlora") else n_params
    settings = dict(mem_kw, fp8=fp8)
    fix = fix_settings = fix_peak = None
    if not mem.fits and suggest_fix:
        found = smallest_fix(cfg if name == "custom" else model, gpu=g, gpus=gpus, **mem_kw)
        if found:
            fix, fix_settings, fix_peak = found
    return Estimate(
        model=name,
        shape=shape_of(cfg),
        n_params=n_params,
        n_trainable=trainable,
        tokens=n_tokens,
        seq_len=seq_len,
        gpu=g.name,
        gpus=gpus,
        flops_per_token=fpt,
        flops=fpt * n_tokens,
        mfu=used_mfu,
        tokens_per_s_per_gpu=tps,
        throughput_source=source,
        gpu_hours=gpu_hours,
        days=gpu_hours / gpus / 24,
        usd_per_gpu_hour=price,
        usd=gpu_hours * price,
        memory=mem,
        settings=settings,
        fits=mem.fits,
        fix=fix,
        fix_settings=fix_settings,
        fix_memory_peak=fix_peak,
    )


# Changes the planner may suggest: (setting, value, cost, description). Costs rank what a user gives up:
# nothing much (1), compute (checkpointing ~+33%), a little optimizer precision (3), hardware (3 per
# doubling of the GPU count), speed (offload, 7: the step is then bound by a CPU AdamW over every
# parameter and PCIe traffic), or a different result (LoRA, 9; QLoRA from LoRA 3, like 8-bit AdamW: a
# little base precision and the time to dequantise it; from a full fine-tune 9 + 3). The last field: the current values a change applies
# to (None: any other value). Rejected: doubling cost 2 -- it answers
# "8x RTX 4090, 13B" with "buy 8 more" instead of "checkpointing + 8-bit AdamW" on the cards you have.
_CHANGES = (
    ("micro_batch", 1, 1, "micro-batch 1 with gradient accumulation (--micro-batch 1)", None),
    ("fused_loss", True, 1, "fused linear-cross-entropy (--fused-loss)", None),
    ("sharding", "fsdp", 1, "FSDP sharding (--sharding fsdp)", None),
    ("checkpointing", True, 2, "activation checkpointing (--checkpointing, ~+33% compute)", None),
    ("optimizer", "adamw8bit", 3, "8-bit AdamW (--optimizer adamw8bit)", None),
    ("offload", True, 7, "CPU offload of weights, gradients and optimizer state (--offload, slow)", None),
    ("finetune", "lora", 9, "LoRA instead of full fine-tuning (--finetune lora)", ("full",)),
    ("finetune", "qlora", 12, "QLoRA instead of full fine-tuning (--finetune qlora)", ("full",)),
    ("finetune", "qlora", 3, "QLoRA: LoRA on a 4-bit NF4 base (--finetune qlora)", ("lora",)),
)
_DOUBLING_COST = 3
_MAX_GPUS = 1 << 14


def smallest_fix(model, *, gpu, gpus: int, **settings) -> Optional[tuple[str, dict[str, Any], float]]:
    """The cheapest change that makes `memory(...)` fit, as (description, settings, peak bytes): least
    total cost (see _CHANGES; more GPUs cost 3 per doubling, FSDP shards the state across them), then
    fewest changes, then fewest GPUs. None when nothing up to 16,384 GPUs fits."""
    options = [
        c
        for c in _CHANGES
        if settings.get(c[0]) != c[1]
        and not (c[0] == "micro_batch" and settings.get("micro_batch", 1) <= 1)
        and (c[4] is None or settings.get(c[0]) in c[4])
    ]
    best = None
    for r in range(len(options) + 1):
        for combo in itertools.combinations(options, r):
            if len({c[0] for c in combo}) < r:  # two values of one setting
                continue
            trial = dict(settings, **{c[0]: c[1] for c in combo})
            k, doublings = gpus, 0
            grows = trial.get("sharding") == "fsdp" or trial.get("offload")
            while True:
                m = memory(model, gpu=gpu, gpus=k, **trial)
                if m.fits or not grows or k * 2 > _MAX_GPUS:
                    break
                k, doublings = k * 2, doublings + 1
            if not m.fits:
                continue
            cost = sum(c[2] for c in combo) + _DOUBLING_COST * doublings
            key = (cost, r + (k != gpus), k)
            if best is None or key < best[0]:
                words = [c[3] for c in combo] + (
                    [f"{k} GPUs (FSDP shards the state {k}-way)"] if k != gpus else []
                )
                best = (key, " + ".join(words), dict(trial, gpus=k), m.peak)
    return None if best is None else (best[1], best[2], best[3])


def compare(
    model: Union[str, LlamaConfig, int, float],
    tokens: Union[str, float, int],
    setups: Iterable[Union[str, tuple[Union[str, GPU], int]]],
    **kwargs: Any,
) -> list[Estimate]:
    """One estimate per GPU setup ("H100:8", ("a100-80gb", 64), ...), same model, tokens and settings.
    A per-setup price applies only when `usd_per_gpu_hour` is not given."""
    out = []
    for s in setups:
        name, k = parse_setup(s) if isinstance(s, str) else s
        out.append(estimate(model, tokens, name, k, **kwargs))
    return out


def parse_setup(text: str, default_gpus: int = 1) -> tuple[str, int]:
    name, _, k = text.strip().partition(":")
    try:
        n = int(k) if k else default_gpus
    except ValueError:
        raise ValueError(f"bad GPU setup {text!r}; expected NAME or NAME:COUNT, e.g. H100:8") from None
    if n < 1:
        raise ValueError(f"bad GPU setup {text!r}: count must be >= 1")
    get_gpu(name)
    return name, n


# ------------------------------------------------------------------------------------- train logs


@dataclass(frozen=True)
class TrainLog:
    tokens_per_s_per_gpu: float
    mfu: float  # under the planner's FLOP count (logs from before the trainer used it are converted)
    n_params: int
    seq_len: int
    gpu: Optional[str]
    world_size: int
    n_steps: int  # steps used (after warm-up)
    shape: Optional[LlamaConfig] = None  # the model shape the log records (None in older logs)


#: The fields of a model shape (`shape_of`), as `Estimate.shape` and each training-log step carry it.
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden", "vocab_size", "tie")


def shape_of(c: LlamaConfig) -> dict[str, Any]:
    """The model shape as `Estimate.shape` and `tokenmill train`'s log record it: what
    `flops_per_token` needs, so `plan --from-log` does not guess it from the parameter count.

    >>> shape_of(PRESETS["llama-7b"])
    {'dim': 4096, 'n_layers': 32, 'n_heads': 32, 'kv_heads': 32, 'ffn_hidden': 11008, 'vocab_size': 32000, 'tie': False}
    """
    return {
        "dim": c.dim,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "kv_heads": c.kv_heads,
        "ffn_hidden": c.hidden_dim,
        "vocab_size": c.vocab_size,
        "tie": c.tie_embeddings,
    }


def _shape_from_log(m: Any, where: str) -> LlamaConfig:
    if not isinstance(m, dict) or set(m) != set(SHAPE_KEYS):
        raise ValueError(f"{where}: model must be an object with keys {', '.join(SHAPE_KEYS)}, got {m!r}")
    for k in SHAPE_KEYS[:-1]:
        if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] <= 0:
            raise ValueError(f"{where}: model.{k} must be a positive integer, got {m[k]!r}")
    if not isinstance(m["tie"], bool):
        raise ValueError(f"{where}: model.tie must be true or false, got {m['tie']!r}")
    try:
        return LlamaConfig(
            vocab_size=m["vocab_size"],
            dim=m["dim"],
            n_layers=m["n_layers"],
            n_heads=m["n_heads"],
            n_kv_heads=m["kv_heads"],
            ffn_hidden=m["ffn_hidden"],
            tie_embeddings=m["tie"],
        )
    except ValueError as e:
        raise ValueError(f"{where}: model: {e}") from None


def read_train_log(path: Union[str, Path], warmup: Optional[int] = None) -> TrainLog:
    """Median throughput of a `tokenmill train` JSONL log after warm-up (the first max(5, 10%) steps are
    compilation, allocator growth and data-loader start-up; dropped unless `warmup` says otherwise)."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            if "tokens_per_s_per_gpu" not in row:
                continue  # eval or checkpoint records
            for k in ("tokens_per_s_per_gpu", "n_params", "seq_len"):
                v = row.get(k)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"{path}:{lineno}: {k} must be a positive number, got {v!r}")
            if "model" in row:
                row = {**row, "model": _shape_from_log(row["model"], f"{path}:{lineno}")}
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no training steps with tokens_per_s_per_gpu")
    skip = max(5, len(rows) // 10) if warmup is None else warmup
    if skip >= len(rows):
        skip = 0 if warmup is None and len(rows) < 2 else min(skip, len(rows) - 1)
    used = rows[skip:]
    last = used[-1]
    tps = statistics.median(r["tokens_per_s_per_gpu"] for r in used)
    mfus = [r["mfu"] for r in used if isinstance(r.get("mfu"), (int, float)) and r["mfu"] > 0]
    gpu = last.get("gpu")
    n_params, seq_len = int(last["n_params"]), int(last["seq_len"])
    shape: Optional[LlamaConfig] = last.get("model")
    # Logs from before the trainer recorded its shape: the preset with this parameter count, else a
    # LLaMA-like shape.
    cfg = shape or next((c for c in PRESETS.values() if c.num_params() == n_params), None)
    cfg = cfg or shape_for_params(n_params)
    ours = flops_per_token(cfg, seq_len, n_params)
    if mfus and shape is not None:
        mfu = statistics.median(mfus)  # the trainer's MFU is `flops_per_token`'s
    elif mfus:
        # Older trainers counted PaLM's unmasked 12 L d s attention term; convert to ours (6 L d s).
        palm = ours + 3 * 2 * cfg.n_layers * cfg.dim * seq_len
        mfu = statistics.median(mfus) * ours / palm
    else:
        g = _known_gpu(str(gpu)) if gpu is not None else None
        if g is None:
            raise ValueError(f"{path}: no mfu field and GPU {gpu!r} is not in the table")
        mfu = tps * ours / g.peak_flops("bf16")
    return TrainLog(
        tokens_per_s_per_gpu=float(tps),
        mfu=float(mfu),
        n_params=n_params,
        seq_len=seq_len,
        gpu=None if gpu is None else str(gpu),
        world_size=int(last.get("world_size", 1)),
        n_steps=len(used),
        shape=shape,
    )


# ----------------------------------------------------------------------------------------- tables


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def format_estimate(e: Estimate) -> str:
    m = e.memory
    s = e.settings
    strategy = [s["precision"], s["optimizer"], s["sharding"] if e.gpus > 1 or s["offload"] else "1 GPU"]
    strategy += [k for k in ("checkpointing", "offload", "fused_loss") if s[k]]
    if s["finetune"]:
        strategy.append(
            f"finetune={s['finetune']}"
            + (f" r={s['lora_rank']}" if s["finetune"] in ("lora", "qlora") else "")
        )
    lines = [
        f"model      {e.model}: {e.n_params / 1e9:.2f}B parameters, {e.shape['n_layers']} layers x dim "
        f"{e.shape['dim']} ({e.shape['n_heads']} heads, {e.shape['kv_heads']} KV), FFN {e.shape['ffn_hidden']}, "
        f"vocab {e.shape['vocab_size']}"
        + (f" ({e.n_trainable / 1e6:.1f}M trainable)" if e.n_trainable != e.n_params else ""),
        f"tokens     {e.tokens:.4g} at seq_len {e.seq_len}, micro-batch {s['micro_batch']}",
        f"compute    {e.flops:.3e} FLOPs ({e.flops_per_token / 1e9:.2f} GFLOPs/token = 6N + 6*L*s*d)",
        f"hardware   {e.gpus} x {e.gpu}, MFU {e.mfu:.3f} ({e.throughput_source}), "
        f"{e.tokens_per_s_per_gpu:,.0f} tokens/s/GPU",
        f"time       {e.gpu_hours:,.0f} GPU-hours = {e.days:,.1f} days on {e.gpus} GPUs",
        f"cost       ${e.usd:,.0f} at ${e.usd_per_gpu_hour:.2f}/GPU-hour",
        f"memory/GPU ({', '.join(strategy)}), GB:",
        f"  weights {_gb(m.weights)}  grads {_gb(m.grads)}  master {_gb(m.master_weights)}  "
        f"optimizer {_gb(m.optimizer)} (+{_gb(m.optimizer_transient)} in step)  fsdp buffers {_gb(m.fsdp_buffers)}",
        f"  activations {_gb(m.activations)} (+{_gb(m.backward_workspace)} backward workspace)"
        + (f"  host RAM {_gb(m.cpu_offloaded)}/GPU" if m.cpu_offloaded else ""),
        f"  peak {_gb(m.peak)} of {_gb(m.usable)} usable ({_gb(m.capacity)} x {USABLE_FRACTION})",
        f"verdict    {'fits' if e.fits else 'does NOT fit'}"
        + (
            f"; smallest change: {e.fix} -> peak {_gb(e.fix_memory_peak)} GB"
            if e.fix and e.fix_memory_peak is not None
            else ""
        ),
    ]
    if not e.fits and not e.fix:
        lines[-1] += "; no change in reach makes it fit"
    return "\n".join(lines)


def format_table(estimates: Sequence[Estimate]) -> str:
    """Markdown table: one row per setup, cost vs days."""
    head = "| GPU | GPUs | MFU | tokens/s/GPU | GPU-hours | days | $/GPU-h | cost | mem/GPU GB | fits |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in estimates:
        verdict = "yes" if e.fits else ("no; " + e.fix if e.fix else "no")
        rows.append(
            f"| {e.gpu} | {e.gpus} | {e.mfu:.2f} | {e.tokens_per_s_per_gpu:,.0f} | {e.gpu_hours:,.0f} | "
            f"{e.days:,.1f} | {e.usd_per_gpu_hour:.2f} | ${e.usd:,.0f} | {_gb(e.memory.peak)} | {verdict} |"
        )
    return "\n".join(rows)


__all__ = [
    "GPU",
    "Estimate",
    "Memory",
    "TrainLog",
    "chinchilla_tokens",
    "compare",
    "estimate",
    "flops_per_token",
    "format_estimate",
    "format_table",
    "get_gpu",
    "gpus",
    "load_gpu_table",
    "memory",
    "nf4_bytes",
    "read_train_log",
    "register_gpu",
    "resolve_model",
    "shape_for_params",
    "shape_of",
    "smallest_fix",
]
