"""AdamW with 8-bit block-wise quantised moments (Dettmers et al., 2022; bitsandbytes' AdamW8bit).

Each moment tensor is stored as uint8 indices into a 256-entry dynamic code (``dynamic_code``: signed for
the first moment, unsigned for the second) plus one fp32 absmax per block of 256 elements: 2 + 8/256 bytes
of state per parameter instead of torch AdamW's 8. Tensors smaller than ``min_8bit_size`` keep fp32 moments,
as bitsandbytes does (norm weights and biases are few and sensitive).

CUDA parameters with 8-bit state run one fused multi-tensor kernel launch per (param group, device, dtype)
(kernels/adamw8bit.cu); CPU parameters run ``reference_step``, the same algorithm in torch.

FSDP2 (``fully_shard``) parameters are DTensors: each rank quantises and updates its own shard
(``p.to_local()``), block-wise over the shard's flat data, so a block never spans two ranks and the step
needs no communication. Its state is DTensors too (what torch.distributed.checkpoint needs to save and
load it sharded): the codes are sharded as the parameter is; the absmax of rank r's blocks is row r of a
``[shards, max blocks per shard]`` tensor sharded on dim 0 (short rows padded with zeros). So the blocks
follow the sharding: when every rank's shard is a whole number of 256-element blocks (the usual case for
LLaMA matrices) the update equals the single-process one exactly; otherwise blocks straddle other
elements and the moments are quantised with other scales. State saved under one sharding loads only
under the same one (see ``load_state_dict``).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeGuard

BLOCK = 256
_TYPE_NAME = {torch.float32: "f32", torch.bfloat16: "bf16"}
_CODES: dict[tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_code(signed: bool) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``: 256 sorted fp32 values
    in [-1, 1] (or [0, 1]); the exponent picks a decade 1e-6..1, the remaining bits a linear fraction."""
    data: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0).tolist()
        data += [10 ** (-6 + i) * m for m in means]
        if signed:
            data += [-(10 ** (-6 + i)) * m for m in means]
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, device)
    if key not in _CODES:
        _CODES[key] = dynamic_code(signed).to(device)
    return _CODES[key]


@functools.cache
def _zero_index(signed: bool) -> int:
    return int(torch.searchsorted(dynamic_code(signed), torch.tensor(0.0)))


def quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantisation of a flat fp32 tensor: (uint8 indices of the nearest code, absmax per block).
    Ties go to the lower code, as in the kernel."""
    n = x.numel()
    n_blocks = (n + BLOCK - 1) // BLOCK
    blocks = torch.zeros(n_blocks * BLOCK, dtype=torch.float32, device=x.device)
    blocks[:n] = x
    blocks = blocks.view(n_blocks, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    xn = (blocks * inv[:, None]).view(-1)[:n]
    lo = (torch.searchsorted(code, xn, right=True) - 1).clamp_(0, 255)
    hi = (lo + 1).clamp_(max=255)
    up = (lo < 255) & ((code[hi] - xn) < (xn - code[lo]))
    return (lo + up.long()).to(torch.uint8), absmax


# The kernel's nearest-code lookup (kernels/adamw8bit.cu: tm_quantize): constants shared with the .cu source.
Q_LO = 0x34000000  # 2^-23: smaller magnitudes share the first bucket
Q_HI = 0x3F800000  # 1.0: larger magnitudes share the last bucket
Q_SHIFT = {True: 17, False: 16}  # bucket width in float patterns: signed (m), unsigned (v)


def _nearest_code(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``quantize``'s rule on already normalised fp32 values (numpy): the index of the nearest code, ties
    to the lower one, differences in fp32; NaN -> 255 (searchsorted sorts NaN last)."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.clip(np.searchsorted(code, x, side="right") - 1, 0, 255)
    hi = np.minimum(lo + 1, 255)
    with np.errstate(invalid="ignore"):
        up = (lo < 255) & ((code[hi] - x) < (x - code[lo]))
    return (lo + up).astype(np.int64)


def _ordered_to_float(keys: np.ndarray) -> np.ndarray:
    """Floats from keys that order them (key = bits ^ 0x80000000 for +, ~bits for -)."""
    k = np.asarray(keys, dtype=np.int64)
    bits = np.where(k >= 0x80000000, k ^ 0x80000000, 0xFFFFFFFF - k).astype(np.uint32)
    return bits.view(np.float32)


@functools.cache
def quant_tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, bucket bases) of the kernel's lookup for ``dynamic_code(signed)``.

    The nearest-code index is a non-decreasing step function of x; thresholds[j] is the smallest float
    quantised to j + 1 or above (found by bisection over all floats with the reference rule itself;
    thresholds[255] = NaN, never reached). Bucket b of a sign covers 2^Q_SHIFT consecutive magnitude
    patterns (clamped to [Q_LO, Q_HI]); bases[b] is the index of its smallest value (negative-side buckets
    after the positive ones). Checked here: no bucket holds more than one threshold, so the kernel's
    ``base + (x >= thresholds[base])`` equals the reference for every float."""
    code = dynamic_code(signed).numpy()
    j = np.arange(1, 256)
    lo = np.full(255, 0x007FFFFF, dtype=np.int64)  # -inf: index 0
    hi = np.full(255, 0xFF800000, dtype=np.int64)  # +inf: index 255
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        ok = _nearest_code(code, _ordered_to_float(mid)) >= j
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    thr = np.append(_ordered_to_float(hi), np.float32(np.nan)).astype(np.float32)
    shift = Q_SHIFT[signed]
    nb = ((Q_HI - Q_LO) >> shift) + 1
    b = np.arange(nb, dtype=np.int64)
    mag_lo = np.where(b == 0, 0, Q_LO + (b << shift)).astype(np.uint32).view(np.float32)
    mag_hi = (
        np.where(b == nb - 1, 0x7F800000, Q_LO + ((b + 1) << shift) - 1).astype(np.uint32).view(np.float32)
    )
    base = np.concatenate([_nearest_code(code, mag_lo), _nearest_code(code, -mag_hi)])
    top = np.concatenate([_nearest_code(code, mag_hi), _nearest_code(code, -mag_lo)])
    if (top - base).max() > 1 or abs(float(thr[0])) < 2.0**-23:
        raise AssertionError("quantisation buckets too wide for the kernel's one-comparison lookup")
    return thr, base.astype(np.uint8)


def quant_table_words() -> np.ndarray:
    """The kernel's ``qtab`` argument (uint32 words): code1, code2, thresholds1, thresholds2 (fp32), then
    the uint8 bucket bases of the signed and the unsigned code, each padded to whole words."""
    parts = [
        dynamic_code(True).numpy(),
        dynamic_code(False).numpy(),
        quant_tables(True)[0],
        quant_tables(False)[0],
    ]
    words = [np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) for x in parts]
    for signed in (True, False):
        base = quant_tables(signed)[1]
        padded = np.zeros(-(-base.size // 4) * 4, dtype=np.uint8)
        padded[: base.size] = base
        words.append(padded.view(np.uint32))
    return np.concatenate(words)


def quantize_lookup(xn: np.ndarray, signed: bool) -> np.ndarray:
    """The kernel's lookup in numpy (tests compare it with ``quantize``'s rule on every kind of float)."""
    thr, base = quant_tables(signed)
    x = np.asarray(xn, dtype=np.float32)
    u = x.view(np.uint32).astype(np.int64)
    a = u & 0x7FFFFFFF
    neg = (u >> 31) & (a <= 0x7F800000)
    shift = Q_SHIFT[signed]
    nb = ((Q_HI - Q_LO) >> shift) + 1
    b = base[neg * nb + ((np.clip(a, Q_LO, Q_HI) - Q_LO) >> shift)].astype(np.int64)
    with np.errstate(invalid="ignore"):
        return b + (x >= thr[b])


def dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return code[q.long()] * scale


def step_scalars(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int
) -> dict[str, float]:
    """The fp32 scalars of one step, shared by reference_step and the kernel's arguments (each computed in
    double, rounded once to fp32), so that both compute the same fp32 operations on the same values."""
    bc1 = 1 - beta1**step
    vals = {
        "beta1": beta1,
        "beta2": beta2,
        "one_minus_beta1": 1 - beta1,
        "one_minus_beta2": 1 - beta2,
        "eps": eps,
        "step_size": lr / bc1,
        "inv_bc2_sqrt": 1 / math.sqrt(1 - beta2**step),
        "decay": 1 - lr * weight_decay,
    }
    return {name: float(np.float32(v)) for name, v in vals.items()}


def reference_step(
    p: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, Any],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW8bit step in torch on a flat view (the algorithm of kernels/adamw8bit.cu); updates p and state."""
    k = step_scalars(lr, beta1, beta2, eps, weight_decay, state["step"])
    pf = p.detach().view(-1).float()
    gf = g.view(-1).float()
    c1, c2 = _code(True, p.device), _code(False, p.device)
    m = k["beta1"] * dequantize(state["state1"], state["absmax1"], c1) + k["one_minus_beta1"] * gf
    v = k["beta2"] * dequantize(state["state2"], state["absmax2"], c2) + k["one_minus_beta2"] * gf * gf
    # sqrt through float64: correctly rounded, as the kernel's (torch's AVX-512 fp32 sqrt is not: ~20% of
    # results 1 ulp off on the machine this was written on)
    sqrt_v = v.double().sqrt().float()
    pf = pf * k["decay"] - k["step_size"] * m / (sqrt_v * k["inv_bc2_sqrt"] + k["eps"])
    p.detach().view(-1).copy_(pf)
    state["state1"], state["absmax1"] = quantize(m, c1)
    state["state2"], state["absmax2"] = quantize(v, c2)


def _fp32_step(p, g, state, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.AdamW's update with fp32 moments (tensors below min_8bit_size)."""
    step = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    gf = g.float()
    m.lerp_(gf, 1 - beta1)
    v.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
    bc1, bc2_sqrt = 1 - beta1**step, math.sqrt(1 - beta2**step)
    pf = p.detach().float() * (1 - lr * weight_decay)
    pf.addcdiv_(m, v.sqrt() / bc2_sqrt + eps, value=-lr / bc1)
    p.detach().copy_(pf)


# ----------------------------------------------------------------------------------------------------------
# Sharded (DTensor) parameters: FSDP2's fully_shard, Shard(0) on a 1-D or hybrid (Replicate, Shard) mesh.


def _is_dtensor(t: Any) -> TypeGuard[DTensor]:
    # torch.distributed.tensor takes ~0.5 s to import: without it loaded no DTensor can exist
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _absmax_layout(p: Any) -> tuple[torch.Size, tuple]:
    """Global shape and placements of a DTensor parameter's absmax state: ``[shards, max blocks per shard]``,
    sharded on dim 0 over the mesh dimensions that shard ``p`` (one row per shard), replicated over the
    others. The largest shard is the first one (torch.chunk), whose block count sets the row length."""
    from torch.distributed.tensor import Replicate, Shard

    shape, shards = list(p.shape), 1
    placements: list[Shard | Replicate] = []
    for size, pl in zip(p.device_mesh.shape, p.placements):
        if type(pl) is Shard:  # not _StridedShard (FSDP2 + tensor parallel): its chunks are not torch.chunk's
            shape[pl.dim] = -(-shape[pl.dim] // size)
            shards *= size
            placements.append(Shard(0))
        elif isinstance(pl, Replicate):
            placements.append(Replicate())
        else:
            raise ValueError(
                f"AdamW8bit: DTensor parameters must be sharded (Shard) or replicated, got placements "
                f"{p.placements}"
            )
    return torch.Size((shards, -(-math.prod(shape) // BLOCK))), tuple(placements)


def _dtensor_like(p: Any, local: torch.Tensor, shape: Sequence[int], placements: Sequence[Any]) -> Any:
    from torch.distributed.tensor import DTensor

    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * shape[d + 1]
    return DTensor.from_local(
        local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride)
    )


class _ShardState(dict):
    """This rank's view of a DTensor parameter's state: plain tensors sharing the DTensors' storage.
    Storing a tensor under a key it has (reference_step replaces the moments) copies it into the shard."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and key in self:
            self[key].copy_(value)
        else:
            super().__setitem__(key, value)


def _check_layout(i: int, p: torch.Tensor, state: dict[str, Any]) -> None:
    """Refuse state whose tensors do not fit ``p`` as this optimizer lays them out: 8-bit state saved
    under another sharding (world size) has its blocks elsewhere and cannot be re-sharded exactly."""
    sharded = _is_dtensor(p)
    placements = tuple(p.placements) if _is_dtensor(p) else None
    if "state1" not in state:
        expected = dict.fromkeys(("exp_avg", "exp_avg_sq"), (tuple(p.shape), placements))
    elif sharded:
        shape, absmax_placements = _absmax_layout(p)
        expected = dict.fromkeys(("state1", "state2"), (tuple(p.shape), placements))
        expected.update(dict.fromkeys(("absmax1", "absmax2"), (tuple(shape), absmax_placements)))
    else:
        expected = dict.fromkeys(("state1", "state2"), ((p.numel(),), None))
        expected.update(dict.fromkeys(("absmax1", "absmax2"), ((-(-p.numel() // BLOCK),), None)))

    def describe(layout: Any) -> str:
        if layout is None:
            return "missing"
        return f"shape {layout[0]}" + (f" sharded as {layout[1]}" if layout[1] is not None else " unsharded")

    for key, want in expected.items():
        v = state.get(key)
        got = None
        if isinstance(v, torch.Tensor):
            got = (tuple(v.shape), tuple(v.placements) if _is_dtensor(v) else None)
        if got != want:
            why = (
                f" 8-bit state is quantised in blocks of {BLOCK} elements of each rank's shard: it resumes "
                "only on the sharding (world size) that saved it; re-sharding would re-quantise the "
                "moments, which is not exact."
                if "state1" in state
                else ""
            )
            raise ValueError(
                f"AdamW8bit.load_state_dict: state {key!r} of parameter {i} (shape {tuple(p.shape)}) is "
                f"{describe(got)}, expected {describe(want)}.{why}"
            )


def _cuda_multi_step(
    items: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    tables: dict[Any, tuple[np.ndarray, torch.Tensor]],
    key: Any = None,
) -> None:
    """One kernel launch for (param, grad, state) triples of one device and dtype at the same step, with
    8-bit state. The kernel finds each tensor through a device table of pointers (kernels/adamw8bit.cu); the
    table is uploaded (pinned memory, asynchronously) only when a pointer or size changed, else reused from
    ``tables[key]``. No host synchronisation."""
    from tokenmill.kernels import launch

    items = [it for it in items if it[0].numel() > 0]
    if not items:
        return
    p0 = items[0][0]
    n_t = len(items)
    # [pointers 6n | sizes n | qb_start n + 1], built as one list (numpy item assignment costs ~1 us a call)
    ptrs: list[int] = []
    sizes: list[int] = []
    starts: list[int] = []
    qb = 0
    for p, g, st in items:
        ptrs += (
            p.data_ptr(),
            g.data_ptr(),
            st["state1"].data_ptr(),
            st["state2"].data_ptr(),
            st["absmax1"].data_ptr(),
            st["absmax2"].data_ptr(),
        )
        n = p.numel()
        sizes.append(n)
        starts.append(qb)
        qb += (n + BLOCK - 1) // BLOCK
    starts.append(qb)
    meta = np.array(ptrs + sizes + starts, dtype=np.int64)
    cached = tables.get(key)
    if cached is not None and np.array_equal(cached[0], meta):
        table = cached[1]
    else:
        table = torch.from_numpy(meta.copy())
        if p0.is_cuda:  # the pinned staging buffer is released only after the copy ran (torch tracks it)
            table = table.pin_memory().to(p0.device, non_blocking=True)
        tables[key] = (meta, table)
    dev = p0.device.index
    fn = f"adamw8bit_{_TYPE_NAME[p0.dtype]}"
    grid = max(
        1, min((qb + 3) // 4, launch.sm_count(dev) * launch.resident_blocks("adamw8bit", fn, dev, 256))
    )
    base = table.data_ptr()
    k = step_scalars(lr, beta1, beta2, eps, weight_decay, step)
    args = (
        np.uint64(base),
        np.uint64(base + 8 * 6 * n_t),
        np.uint64(base + 8 * 7 * n_t),
        np.int32(n_t),
        _qtab(p0.device),
        *(np.float32(k[name]) for name in _KERNEL_SCALARS),
    )
    launch.launch("adamw8bit", fn, dev, grid, 256, args)


# the kernel's float parameters after qtab, in order
_KERNEL_SCALARS = (
    "beta1",
    "beta2",
    "one_minus_beta1",
    "one_minus_beta2",
    "eps",
    "step_size",
    "inv_bc2_sqrt",
    "decay",
)
_QTABS: dict[torch.device, torch.Tensor] = {}


def _qtab(device: torch.device) -> torch.Tensor:
    t = _QTABS.get(device)
    if t is None:
        t = _QTABS[device] = torch.from_numpy(quant_table_words().view(np.int32)).to(device)
    return t


def _runs_kernel(p: torch.Tensor) -> bool:
    """Whether ``p`` is stepped by the CUDA kernel (the emulator tests make CPU tensors take this path)."""
    return p.is_cuda


def _cuda_step(p, g, state, lr, beta1, beta2, eps, weight_decay) -> None:
    """The multi-tensor kernel on a single tensor (no table cache)."""
    _cuda_multi_step([(p.detach(), g, state)], lr, beta1, beta2, eps, weight_decay, state["step"], {})


_STEP_DTYPES = (torch.float32, torch.bfloat16)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with 8-bit block-wise quantised moments.

    Same hyper-parameters and defaults as ``torch.optim.AdamW``. Parameters: float32 or bfloat16, dense,
    contiguous; plain tensors or FSDP2-sharded DTensors (each rank steps its shard; see the module
    docstring). ``state_dict()``/``load_state_dict()`` round-trip the quantised state exactly, also through
    ``torch.distributed.checkpoint`` (sharded, or full state dicts) on the same world size.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if not (len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size
        )
        super().__init__(params, defaults)
        # device pointer tables of the multi-tensor kernel, one per launch of a step (see _cuda_multi_step)
        self._tables: dict[Any, tuple[np.ndarray, torch.Tensor]] = {}
        # DTensor parameters: their state's local tensors, rebuilt when a state tensor is replaced
        self._views: dict[torch.Tensor, tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickling / deepcopy keep torch's fields only; the pointer tables are rebuilt on the next step
        super().__setstate__(state)
        self._tables = {}
        self._views = {}

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], min_8bit_size: int) -> None:
        state["step"] = 0
        # p.numel() is the global size for a DTensor: every rank picks the same kind of state
        if _is_dtensor(p):
            local = p.to_local()
            dev = local.device
            if p.numel() >= min_8bit_size:
                shape, placements = _absmax_layout(p)
                for k, zero in (("state1", _zero_index(True)), ("state2", _zero_index(False))):
                    codes = torch.full(local.shape, zero, dtype=torch.uint8, device=dev)
                    state[k] = _dtensor_like(p, codes, p.shape, p.placements)
                for k in ("absmax1", "absmax2"):
                    absmax = torch.zeros(1, shape[1], dtype=torch.float32, device=dev)
                    state[k] = _dtensor_like(p, absmax, shape, placements)
            else:
                for k in ("exp_avg", "exp_avg_sq"):
                    zeros = torch.zeros(local.shape, dtype=torch.float32, device=dev)
                    state[k] = _dtensor_like(p, zeros, p.shape, p.placements)
        elif p.numel() >= min_8bit_size:
            n_blocks = (p.numel() + BLOCK - 1) // BLOCK
            zero1, zero2 = _zero_index(True), _zero_index(False)
            state["state1"] = torch.full((p.numel(),), zero1, dtype=torch.uint8, device=p.device)
            state["state2"] = torch.full((p.numel(),), zero2, dtype=torch.uint8, device=p.device)
            state["absmax1"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(n_blocks, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _shard(self, i: int, p: Any, g: Any, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """A DTensor parameter's local shard, its gradient's, and its state as flat views of the shard's
        state (a _ShardState, cached while the state tensors stay the same); the absmax views hold this
        shard's blocks only (the row's padding is never touched)."""
        if not (
            _is_dtensor(p)
            and _is_dtensor(g)
            and g.placements == p.placements
            and g.device_mesh == p.device_mesh
        ):
            raise ValueError(
                f"param {i}: a parameter and its gradient must both be plain tensors or both DTensors "
                f"sharded the same way; got {getattr(p, 'placements', 'a plain tensor')} and "
                f"{getattr(g, 'placements', 'a plain tensor')}"
            )
        pl = p.to_local()
        if not pl.is_contiguous():
            raise ValueError(f"param {i}: its local shard must be contiguous")
        keys = ("state1", "state2", "absmax1", "absmax2") if "state1" in state else ("exp_avg", "exp_avg_sq")
        held = tuple(state[k] for k in keys)
        cached = self._views.get(p)
        if cached is not None and all(a is b for a, b in zip(cached[0], held)):
            views = cached[1]
        else:
            local = {k: v.to_local() for k, v in zip(keys, held)}
            if "state1" in local:
                n_blocks = -(-local["state1"].numel() // BLOCK)
                local = {
                    k: t.view(-1)[: n_blocks if k.startswith("absmax") else None] for k, t in local.items()
                }
            views = _ShardState(local)
            self._views[p] = (held, views)
        views["step"] = state["step"]
        return pl, g.to_local().contiguous(), views

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # (one signature for torch's two overloads: with a closure the loss comes back, else None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            batches: dict[tuple[torch.device, torch.dtype, int], list] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise ValueError("AdamW8bit does not support sparse gradients")
                dtype, dev = p.dtype, p.device
                if dtype not in _STEP_DTYPES:
                    raise ValueError(
                        f"param {i} of its group has dtype {p.dtype}; AdamW8bit takes float32 or bfloat16"
                    )
                if g.dtype != dtype or g.shape != p.shape or g.device != dev:
                    raise ValueError(
                        f"param {i}: grad must match the parameter ({p.dtype}, {tuple(p.shape)}, {p.device}), got ({g.dtype}, {tuple(g.shape)}, {g.device})"
                    )
                if not p.is_contiguous():
                    raise ValueError(f"param {i} of its group must be contiguous")
                g = g.contiguous()
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group["min_8bit_size"])
                state["step"] += 1
                if _is_dtensor(p) or _is_dtensor(g):  # FSDP2: this rank's shard, as plain tensors below
                    p, g, state = self._shard(i, p, g, state)
                    if p.numel() == 0:  # an empty shard (more ranks than rows): only the step counts
                        continue
                if "state1" not in state:
                    _fp32_step(p, g, state, lr, beta1, beta2, eps, wd)
                elif _runs_kernel(p):  # one launch per (device, dtype, step) below
                    # only pointers and sizes are taken from p (no detach needed under no_grad)
                    batches.setdefault((dev, dtype, state["step"]), []).append((p, g, state))
                else:
                    reference_step(p, g, state, lr, beta1, beta2, eps, wd)
            for k, ((dev, dtype, step), items) in enumerate(batches.items()):
                _cuda_multi_step(items, lr, beta1, beta2, eps, wd, step, self._tables, (gi, dev, dtype, k))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every state tensor to a floating parameter's dtype (uint8 codes included): restore
        # each saved tensor with its own dtype.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        keep = {
            pid: {
                k: v.clone()
                for k, v in state_dict["state"].get(pid, {}).items()
                if isinstance(v, torch.Tensor)
            }
            for pid in saved_ids
        }
        if len(saved_ids) == len(params):  # (torch's load_state_dict explains a mismatch)
            for i, (pid, p) in enumerate(zip(saved_ids, params)):
                if keep[pid]:
                    _check_layout(i, p, keep[pid])
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            for k, v in keep[pid].items():
                self.state[p][k] = v.to(device=p.device)
        self._views = {}  # views of the replaced state would keep it alive until the next step

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this process's devices (the goal: about 2 per parameter; for
        DTensor parameters, per element of this rank's shard)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v = _local(v)
                    total += v.numel() * v.element_size()
        return total
