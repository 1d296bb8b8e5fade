"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers et al. 2023), in bitsandbytes' layout.

A weight matrix is cut, row-major, into blocks of ``block_size`` (64) values. Each value is stored as the
4-bit index of the nearest of the 16 NF4 levels (``NF4_LEVELS``, the paper's and bitsandbytes' table)
after dividing by its block's absmax; two indices per byte, element 2i in the high nibble. The absmax
values are double-quantised as bitsandbytes does it: their mean is subtracted, then they are quantised
block-wise (256 per block) to 8 bits in bitsandbytes' signed dynamic map (``adamw8bit.dynamic_code``,
the "8-bit float" of the paper) with one fp32 scale per 256 blocks. Storage per parameter:
0.5 + 1/64 + 4/(64 * 256) bytes = 4.127 bits (the paper's 4 + 0.127).

Error bound per value (what tests/test_quant.py checks): with a the block's absmax and a' its
double-quantised value, |w - level * a'| <= a * gap / 2 + |a - a'|, gap = the largest distance between
adjacent levels (1 - 0.7230 = 0.2770), |a - a'| <= the dynamic map's largest half gap times the
256-block's scale.

``Linear4bit`` is the frozen layer: ``x @ W^T`` with W dequantised to the compute dtype in forward and
again in backward (no weight gradient; nothing dense is kept between them). The CUDA dequantisation is a
CuPy kernel (``kernels/nf4.cu``); CPU tensors use the pure-torch reference (``kernels.reference``).

>>> import torch
>>> from tokenmill.quant import Linear4bit, quantize_nf4, dequantize_nf4
>>> w = torch.randn(128, 64)
>>> q = quantize_nf4(w)
>>> q.nbytes, dequantize_nf4(q).shape  # 4096 packed + 128 absmax codes + 2 fp32 (their scale, offset)
(4232, torch.Size([128, 64]))
>>> layer = Linear4bit.from_linear(torch.nn.Linear(64, 128, bias=False))
>>> layer(torch.randn(2, 64)).shape
torch.Size([2, 128])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tokenmill.kernels import ops, reference
from tokenmill.optim.adamw8bit import BLOCK as ABSMAX_BLOCK
from tokenmill.optim.adamw8bit import dynamic_code
from tokenmill.optim.adamw8bit import quantize as quantize_8bit

__all__ = ["NF4_LEVELS", "NF4Tensor", "Linear4bit", "quantize_nf4", "dequantize_nf4", "state_bytes"]

# bitsandbytes' NF4 map (functional.get_4bit_type("nf4")) = QLoRA paper, Appendix E: quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK = 64
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_CHUNK = 1 << 22  # values quantised at once: bounds the fp32 / int64 temporaries to ~50 MB


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NF4 levels, midpoints between them, the 8-bit absmax code) as fp32 tensors on ``device``."""
    t = _TABLES.get(device)
    if t is None:
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        t = _TABLES[device] = (
            levels.to(device),
            ((levels[1:] + levels[:-1]) / 2).to(device),
            dynamic_code(True).to(device),
        )
    return t


@dataclass
class NF4Tensor:
    """A quantised matrix: ``packed`` uint8 [n_pad / 2], ``absmax`` uint8 [n_blocks] (8-bit codes),
    ``absmax_scale`` fp32 [ceil(n_blocks / 256)], ``absmax_offset`` fp32 [1]; n_pad = n_blocks * block_size
    (the last block is zero-padded)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor
    shape: tuple[int, int]
    block_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)


def state_bytes(shape: tuple[int, int], block_size: int = BLOCK) -> int:
    """Bytes of the quantised state of a ``shape`` matrix (what the planner counts per parameter)."""
    n_blocks = -(-shape[0] * shape[1] // block_size)
    return n_blocks * block_size // 2 + n_blocks + 4 * -(-n_blocks // ABSMAX_BLOCK) + 4


def _check_block_size(block_size: object) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be a positive even integer, got {block_size!r}")
    return block_size


def quantize_nf4(w: torch.Tensor, block_size: int = BLOCK) -> NF4Tensor:
    """Quantise a 2-D float matrix to NF4 with double-quantised absmax, on ``w``'s device (pure torch).

    Values round to the nearest level (a tie to the lower one, as bitsandbytes); a block of zeros stays
    exactly zero. Any shape: the flat matrix is padded with zeros to whole blocks."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"quantize_nf4 takes a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"quantize_nf4 takes a 2-D weight matrix, got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4 takes float32, bfloat16, float16 or float64 weights, got {w.dtype}")
    _check_block_size(block_size)
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: empty matrix of shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_nf4: the weight holds NaN or infinite values")
    levels, mids, code = _tables(w.device)
    flat = w.detach().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // block_size)
    packed = torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK // block_size)  # blocks per chunk
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        x = flat[b0 * block_size : b1 * block_size].float()
        if x.numel() < (b1 - b0) * block_size:
            x = F.pad(x, (0, (b1 - b0) * block_size - x.numel()))
        x = x.view(b1 - b0, block_size)
        a = x.abs().amax(dim=1)
        inv = torch.where(a > 0, 1.0 / a, torch.zeros_like(a))  # multiply by the reciprocal, as bitsandbytes
        idx = torch.bucketize(x * inv[:, None], mids).to(torch.uint8).view(-1)  # ties go to the lower level
        packed[b0 * block_size // 2 : b1 * block_size // 2] = (idx[0::2] << 4) | idx[1::2]
        absmax[b0:b1] = a
    offset = absmax.mean().reshape(1)
    absmax_q, absmax_scale = quantize_8bit(absmax - offset, code)
    return NF4Tensor(packed, absmax_q, absmax_scale, offset, (int(w.shape[0]), int(w.shape[1])), block_size)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense matrix of ``q`` in ``dtype`` (CUDA: the kernel in kernels/nf4.cu; else the reference)."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_nf4: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    levels, _, code = _tables(q.packed.device)
    n = q.shape[0] * q.shape[1]
    args = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset, levels, code, n, q.block_size)
    if ops._runs_kernel(q.packed):
        out = ops.nf4_dequantize(*args, dtype if dtype in ops._CUDA_DTYPES else torch.float32)
        return out.view(q.shape).to(dtype)
    return reference.nf4_dequantize(*args, dtype).view(q.shape)


class _NF4Linear(torch.autograd.Function):
    """y = x @ W^T; W is dequantised in forward and again in backward, so that only the 4-bit state
    lives between them (the QLoRA recipe)."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype = layer, dtype
        return F.linear(x, layer.dequantize(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return dy.to(ctx.dtype) @ ctx.layer.dequantize(ctx.dtype), None, None


class Linear4bit(nn.Module):
    """A frozen, bias-free linear layer with NF4 weights (see the module docstring).

    The compute dtype is autocast's when autocast is on, else ``compute_dtype`` when given, else the
    input's; the output has the input's dtype (autocast's under autocast), like ``nn.Linear``.
    The quantised state is buffers (``.to(device)``, ``state_dict``); the fp32 absmax scale and offset are
    stored as int32 bit patterns so that ``model.to(torch.bfloat16)`` leaves them exact."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size: int = BLOCK,
        compute_dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear4bit needs positive sizes, got {in_features} x {out_features}")
        if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_FLOAT_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = _check_block_size(block_size)
        self.compute_dtype = compute_dtype
        n_blocks = -(-in_features * out_features // block_size)
        u8, i32 = torch.uint8, torch.int32
        self.register_buffer("packed", torch.zeros(n_blocks * block_size // 2, dtype=u8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=u8, device=device))
        self.register_buffer(
            "absmax_scale", torch.zeros(-(-n_blocks // ABSMAX_BLOCK), dtype=i32, device=device)
        )
        self.register_buffer("absmax_offset", torch.zeros(1, dtype=i32, device=device))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: Optional[torch.dtype] = None, block_size: int = BLOCK
    ) -> Linear4bit:
        """Quantise ``linear``'s weight (on its device); ``linear`` itself is left unchanged."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"Linear4bit.from_linear takes an nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError("Linear4bit.from_linear: layers with a bias are not supported (LLaMA has none)")
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], block_size, compute_dtype, device=w.device)
        layer.load_quantized(quantize_nf4(w, block_size))
        return layer

    def load_quantized(self, q: NF4Tensor) -> None:
        """Take the state of an NF4Tensor of this layer's shape and block size."""
        if q.shape != (self.out_features, self.in_features) or q.block_size != self.block_size:
            raise ValueError(
                f"NF4 tensor of shape {q.shape}, block {q.block_size} does not fit Linear4bit "
                f"{self.out_features} x {self.in_features}, block {self.block_size}"
            )
        with torch.no_grad():
            self.packed.copy_(q.packed)
            self.absmax.copy_(q.absmax)
            self.absmax_scale.copy_(q.absmax_scale.view(torch.int32))
            self.absmax_offset.copy_(q.absmax_offset.view(torch.int32))

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(
            self.packed,
            self.absmax,
            self.absmax_scale.view(torch.float32),
            self.absmax_offset.view(torch.float32),
            (self.out_features, self.in_features),
            self.block_size,
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] (in ``dtype``, default compute_dtype or fp32)."""
        return dequantize_nf4(self.quantized(), dtype or self.compute_dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"Linear4bit takes a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}"
            )
        if x.device != self.packed.device:
            raise ValueError(f"input on {x.device}, Linear4bit state on {self.packed.device}")
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = self.compute_dtype or x.dtype
        y = _NF4Linear.apply(x.to(dtype), self, dtype)
        return y if autocast else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}, "
            f"compute_dtype={self.compute_dtype}"
        )
