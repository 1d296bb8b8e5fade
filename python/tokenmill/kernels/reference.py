"""Pure-torch references for the CUDA kernels: what runs on CPU, and the ground truth in tests.

Two kinds of function live here:

* differentiable formulas written the way Hugging Face / PyTorch write them (``rms_norm``, ``apply_rope``,
  ``swiglu``, ``linear_cross_entropy``) -- torch's autograd differentiates them;
* ``*_fwd`` / ``*_bwd`` pairs that mirror the kernels step by step (what is saved, the hand-written
  gradient formulas, chunking); the autograd Functions in ``ops.py`` call these on CPU tensors.

Arithmetic is fp32 (float64 for float64 inputs, which the tests use with gradcheck), rounded to the input
dtype once at the end, as the kernels do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


# ---------------------------------------------------------------------------------------------- RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _acc(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _acc(weight)).to(x.dtype)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [rows, d] -> (y [rows, d], rstd [rows] fp32 (float64 for float64 x))."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[:, None] * _acc(weight)).to(x.dtype), rstd


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w; dw = sum_rows(dy * xhat)."""
    xf, gf, wf = _acc(x), _acc(dy), _acc(weight)
    xhat = xf * rstd[:, None]
    g = gf * wf
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (gf * xhat).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# ---------------------------------------------------------------------------------------------- RoPE


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_inv_freq(head_dim: int, theta: float, device=None, scaling=None) -> torch.Tensor:
    """Hugging Face's inverse frequencies (fp32): the default ones, or LLaMA-3.1's when ``scaling`` is a
    ``tokenmill.config.RopeScaling`` -- operation for operation transformers' ``_compute_llama3_parameters``
    so that the tables agree bit for bit."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    scaling=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape positions.shape + (head_dim,), as LlamaRotaryEmbedding builds them: angles in
    fp32, then cast to ``dtype``. Positions may restart at document boundaries (packed sequences).
    ``scaling``: a ``RopeScaling`` (LLaMA-3.1) or None."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device, scaling)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _expand_table(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # x: [..., S, H, D]; t: [S, D] or [..., S, D] -> broadcast over heads
    return t.unsqueeze(-2)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face ``apply_rotary_pos_emb`` for the [batch, seq, heads, head_dim] layout."""
    c, s = _acc(_expand_table(cos, q)), _acc(_expand_table(sin, q))
    qf, kf = _acc(q), _acc(k)
    return (qf * c + rotate_half(qf) * s).to(q.dtype), (kf * c + rotate_half(kf) * s).to(k.dtype)


def rope_table_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c, s = _acc(_expand_table(cos, x)), _acc(_expand_table(sin, x))
    xf = _acc(x)
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def rope_table_bwd(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Transpose of the forward: dx = g * cos - rotate_half(g * sin) (rotate_half^T = -rotate_half)."""
    c, s = _acc(_expand_table(cos, g)), _acc(_expand_table(sin, g))
    gf = _acc(g)
    return (gf * c - rotate_half(gf * s)).to(g.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE from integer positions ([seq] or [batch, seq]) for x [batch, seq, heads, head_dim]."""
    cos, sin = rope_cos_sin(
        positions, x.shape[-1], theta, torch.float64 if x.dtype == torch.float64 else torch.float32
    )
    return rope_table_fwd(x, cos, sin)


def rope_positions_bwd(g: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    cos, sin = rope_cos_sin(
        positions, g.shape[-1], theta, torch.float64 if g.dtype == torch.float64 else torch.float32
    )
    return rope_table_bwd(g, cos, sin)


# ---------------------------------------------------------------------------------------------- SwiGLU


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(_acc(gate)) * _acc(up)).to(gate.dtype)


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recomputes sigmoid(gate) instead of saving silu(gate)."""
    d, g, u = _acc(dy), _acc(gate), _acc(up)
    s = torch.sigmoid(g)
    dgate = d * u * s * (1 + g * (1 - s))
    dup = d * g * s
    return dgate.to(gate.dtype), dup.to(up.dtype)


# ---------------------------------------------------------------------------------------------- linear CE


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The unfused computation: full logits, then F.cross_entropy in fp32 (float64 for float64 inputs)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(_acc(logits), targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def default_chunk_rows(n_tokens: int, vocab: int) -> int:
    """Rows per logits chunk: about 2^28 logits (512 MiB in bf16), a multiple of 128, at most n_tokens.

    Larger chunks mean fewer read-modify-write passes over grad_weight (one per chunk, 2 bytes x V x H
    each way), smaller ones less memory; at V=128256 this is 2048 rows, 1/24 of eager's extra memory."""
    rows = max(128, ((1 << 28) // max(vocab, 1)) // 128 * 128)
    return max(1, min(n_tokens, rows))


def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_rows: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Chunked forward that also produces the gradients (for an upstream gradient of 1), as the CUDA path does.

    hidden [T, H], weight [V, H], targets [T] int64 -> (loss fp32 scalar, d loss/d hidden, d loss/d weight)."""
    n_tok = hidden.shape[0]
    counted = targets != ignore_index
    n_valid = counted.sum()
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    scale = (1.0 / n_valid.to(acc_dtype)) if reduction == "mean" else torch.ones((), dtype=acc_dtype)
    losses = torch.zeros(n_tok, dtype=acc_dtype)
    gh = torch.empty_like(hidden) if grad_hidden else None
    gw = torch.zeros_like(weight) if grad_weight else None
    for start in range(0, n_tok, chunk_rows):
        end = min(n_tok, start + chunk_rows)
        h = hidden[start:end]
        t = targets[start:end]
        mask = counted[start:end]
        logits = h @ weight.t()  # in the input dtype, like the cuBLAS chunk
        lf = logits.to(acc_dtype)
        lse = torch.logsumexp(lf, dim=-1)
        safe_t = torch.where(mask, t, torch.zeros_like(t))
        picked = lf.gather(1, safe_t[:, None])[:, 0]
        losses[start:end] = torch.where(mask, lse - picked, torch.zeros_like(lse))
        if grad_hidden or grad_weight:
            grad = torch.exp(lf - lse[:, None])
            grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(grad[:, :1]))
            grad = (grad * (scale * mask.to(acc_dtype))[:, None]).to(logits.dtype)  # stored like the kernel
            if gh is not None:
                gh[start:end] = grad @ weight
            if gw is not None:
                gw += (grad.t() @ h).to(gw.dtype)
    total = losses.sum()
    loss = total / n_valid.to(acc_dtype) if reduction == "mean" else total
    return loss, gh, gw


# ---------------------------------------------------------------------------------------------- NF4


def nf4_dequantize(
    packed: torch.Tensor,
    absmax_q: torch.Tensor,
    absmax_scale: torch.Tensor,
    absmax_offset: torch.Tensor,
    levels: torch.Tensor,
    code: torch.Tensor,
    n: int,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The first ``n`` values of an NF4 tensor (tokenmill.quant's layout), flat, in ``dtype``.

    packed: uint8, two 4-bit level indices per byte (element 2i in the high nibble, as bitsandbytes);
    absmax_q: uint8 indices into ``code`` (bitsandbytes' signed dynamic 8-bit map), one per block of
    ``block_size`` values; absmax_scale: fp32, one per 256 absmax values; absmax_offset: fp32 [1].
    In fp32, in the kernel's order: absmax = code[q] * scale + offset, value = level * absmax; rounded once.
    """
    n_blocks = absmax_q.numel()
    absmax = code[absmax_q.long()] * absmax_scale.repeat_interleave(256)[:n_blocks] + absmax_offset
    pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=-1)  # byte -> (high, low)
    out = torch.empty(n_blocks * block_size, dtype=dtype, device=packed.device)
    step = max(1, (1 << 16) // block_size)  # blocks at a time: temporaries stay small next to the output
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        values = pairs[packed[b0 * block_size // 2 : b1 * block_size // 2].long()].view(b1 - b0, block_size)
        out[b0 * block_size : b1 * block_size] = (values * absmax[b0:b1, None]).view(-1)  # rounds once
    return out[:n]
