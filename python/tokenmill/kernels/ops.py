"""Autograd Functions with hand-written backward passes and the public ops.

CUDA tensors go to the CuPy kernels (``launch.py``), CPU tensors to ``reference.py``'s *_fwd/*_bwd pairs,
which follow the kernels' algorithm (so the CPU tests check the hand-written gradients too). Kernels take
float32 and bfloat16; the CPU path also takes float64 (gradcheck).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from tokenmill.kernels import launch, reference

_CUDA_DTYPES = (torch.float32, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_TYPE_NAME = {torch.float32: "f32", torch.bfloat16: "bf16"}
_VEC = {torch.float32: 4, torch.bfloat16: 8}  # elements per 16-byte access


# ---------------------------------------------------------------------------------------------- checks


def _eager(fn):
    """torch.compile runs these ops eagerly (a graph break): dynamo must not trace into the CuPy launcher,
    whose argument marshalling it would turn into tensors/ndarrays (found on an H200 with run.compile)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return functools.wraps(fn)(disable(fn)) if disable is not None else fn


def _runs_kernel(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs the CUDA kernels (benches/kernel_host_overhead.py and the emulator tests
    make CPU tensors take this path)."""
    return t.is_cuda


def _check_float(name: str, t: object, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = _CUDA_DTYPES if t.is_cuda else _CPU_DTYPES
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must have dtype {names} on {t.device.type}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the first argument)")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); call .contiguous()"
        )
    return t


def _check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {ref.dtype} (the dtype of {ref_name})")


def _check_int(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must have dtype torch.int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as the first argument)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous()")
    return t


def _vec(dtype: torch.dtype, divides: int, *tensors: torch.Tensor) -> int:
    """16-byte accesses when they divide the row length and every pointer is 16-byte aligned, else scalar."""
    v = _VEC[dtype]
    if divides % v:
        return 1
    ptrs = 0
    for t in tensors:
        ptrs |= t.data_ptr()
    return 1 if ptrs & 15 else v


# Launch configurations (kernel name, grid, block, shared memory, scalar arguments) per shape, dtype,
# device and vector width: grid sizing, name formatting and numpy scalars are built once per shape instead
# of on every call (host time is most of a small op's cost; benches/kernel_host_overhead.py).
_PLANS: dict[tuple, tuple] = {}


def _plan(key: tuple, make) -> tuple:
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:  # many distinct shapes (e.g. varying sequence lengths): start over
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _threads_for_row(d: int, vec: int) -> int:
    return min(1024, max(32, 32 * math.ceil(math.ceil(d / vec) / 32)))


def _grid_stride(total: int, threads: int, device: int, per_sm: int = 16) -> int:
    return max(1, min(math.ceil(total / threads), launch.sm_count(device) * per_sm))


# ---------------------------------------------------------------------------------------------- RMSNorm


def _rms_norm_fwd_cuda(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., d] contiguous (rows of d elements; no view: views of autograd inputs cost microseconds)."""
    d = x.shape[-1]
    n = x.numel() // d if d else 0
    y = launch.empty(x.shape, x.dtype, x.device)
    rstd = launch.empty((n,), torch.float32, x.device)
    if n == 0:
        return y, rstd
    dev, vec = x.device.index, _vec(x.dtype, d, x, w, y)

    def make():
        fn = f"rms_norm_fwd_{_TYPE_NAME[x.dtype]}_v{vec}"
        return (
            fn,
            (min(n, 1 << 20),),
            (_threads_for_row(d, vec),),
            (np.int64(n), np.int32(d), np.float32(eps)),
        )

    fn, grid, block, scalars = _plan(("rms_fwd", n, d, x.dtype, dev, vec, eps), make)
    launch.launch("rms_norm", fn, dev, grid, block, (x, w, y, rstd, *scalars))
    return y, rstd


def _rms_norm_bwd_cuda(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    n = x.numel() // d if d else 0
    dev = x.device.index
    dx = launch.empty(x.shape, x.dtype, x.device)
    dw = launch.empty((d,), w.dtype, w.device)
    if n == 0:
        return dx, dw.zero_()
    vec = _vec(x.dtype, d, dy, x, w, dx)
    fn, grid, block, smem, scalars, fn2, grid2, scalars2 = _plan(
        ("rms_bwd", n, d, x.dtype, dev, vec), lambda: _rms_norm_bwd_plan(n, d, x.dtype, dev, vec)
    )
    partial = launch.empty((grid[0], d), torch.float32, x.device)
    launch.launch("rms_norm", fn, dev, grid, block, (dy, x, w, rstd, dx, partial, *scalars), shared_mem=smem)
    launch.launch("rms_norm", fn2, dev, grid2, (256,), (partial, *scalars2, dw))
    return dx, dw


def _rms_norm_bwd_plan(n: int, d: int, dtype: torch.dtype, dev: int, vec: int) -> tuple:
    threads = _threads_for_row(d, vec)
    span = threads * vec
    smem = 4 * (-(-d // span) * span)  # dw accumulator, see rms_norm.cu
    if smem > launch.max_shared_mem(dev):
        raise ValueError(
            f"rms_norm backward: hidden size {d} needs {smem} bytes of shared memory, more than this GPU has"
        )
    # A grid that is resident at once (registers and shared memory permitting): a block that had to wait
    # for another to finish would double the time of its share of the rows.
    name = _TYPE_NAME[dtype]
    fn = f"rms_norm_bwd_{name}_v{vec}"
    by_smem = max(1, launch.max_shared_mem(dev) // (smem + 2048))
    per_sm = min(launch.resident_blocks("rms_norm", fn, dev, threads), by_smem)
    grid = min(n, launch.sm_count(dev) * per_sm)
    return (
        fn,
        (grid,),
        (threads,),
        smem,
        (np.int64(n), np.int32(d)),
        f"rms_norm_dw_reduce_{name}",
        (math.ceil(d / 32),),
        (np.int32(grid), np.int32(d)),
    )


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        if _runs_kernel(x):  # the kernels take [..., d] as rows: no reshaping
            y, rstd = _rms_norm_fwd_cuda(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        x2 = x.view(-1, x.shape[-1])
        y, rstd = reference.rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.contiguous().to(x.dtype)
        if _runs_kernel(x):
            dx, dw = _rms_norm_bwd_cuda(dy, x, weight, rstd)
            return dx, dw, None
        d = x.shape[-1]
        dx, dw = reference.rms_norm_bwd(dy.view(-1, d), x.view(-1, d), weight, rstd)
        return dx.view(x.shape), dw, None


@_eager
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LLaMA RMSNorm over the last dimension: ``x * rsqrt(mean(x**2) + eps) * weight`` in fp32, rounded once.

    x: [..., d]; weight: [d], same dtype and device as x. Differentiable in x and weight.

    >>> import torch, tokenmill as tm
    >>> tm.kernels.rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), eps=0.0)
    tensor([[0.8485, 1.1314]])
    """
    _check_float("x", x)
    _check_float("weight", weight, x.device)
    _check_same_dtype("weight", weight, "x", x)
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape ({x.shape[-1] if x.dim() else '?'},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return RMSNormFunction.apply(x, weight, float(eps))


# ---------------------------------------------------------------------------------------------- RoPE


def _rope_dims(name: str, x: torch.Tensor) -> tuple[int, int, int]:
    """x: [..., seq, heads, head_dim] -> (tokens, heads, head_dim)."""
    if x.dim() < 3:
        raise ValueError(f"{name} must have shape [..., seq, heads, head_dim], got {tuple(x.shape)}")
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"{name} head_dim must be even, got {d}")
    return x.numel() // (x.shape[-2] * d) if x.numel() else 0, x.shape[-2], d


def _table_rows(name: str, t: torch.Tensor, x: torch.Tensor) -> int:
    """Rows of a cos/sin table ([seq, d] or [..., seq, d] matching x's leading dims) or of positions."""
    ts, xs = t.shape, x.shape
    if ts[-1:] != xs[-1:] or (ts[:-1] != xs[-3:-2] and ts[:-1] != xs[:-2]):
        seq, d, lead = xs[-3], xs[-1], tuple(xs[:-2])
        raise ValueError(
            f"{name} must have shape {(seq, d)} or {(*lead, d)} for an input of shape {tuple(xs)}, got {tuple(ts)}"
        )
    return t.numel() // xs[-1]


_ROPE_HEADS = 8  # TM_ROPE_HEADS in rope.cu: heads per work item (they share the item's cos/sin)


def _rope_launch(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor | None,
    angles: tuple[torch.Tensor, torch.Tensor],
    rows: int,
    direction: bool | float,
) -> tuple:
    """One launch rotating q and (optionally) k. ``angles``: (cos, sin) tables ("table") or (positions,
    inv_freq) ("positions") with ``rows`` rows; ``direction``: the table kernel's backward flag or the
    positions kernel's sign. Returns (yq, yk or None)."""
    yq = launch.empty(q.shape, q.dtype, q.device)
    yk = launch.empty(k.shape, k.dtype, k.device) if k is not None else None
    # vector accesses need 16-byte alignment of every tensor read or written with them (cos/sin tables; the
    # positions and inv_freq are read element by element)
    ts = (q, yq) if k is None else (q, yq, k, yk)
    half = q.shape[-1] // 2
    vec = _vec(q.dtype, half, *ts, *angles) if kind == "table" else _vec(q.dtype, half, *ts)
    dev = q.device.index
    key = ("rope", kind, q.shape, None if k is None else k.shape, q.dtype, dev, vec, rows, direction)
    plan = _plan(key, lambda: _rope_plan(kind, q, k, rows, direction, dev, vec))
    if plan is not None:
        fn, grid, scalars = plan
        launch.launch("rope", fn, dev, grid, (256,), (q, yq, k, yk, *angles, *scalars))
    return yq, yk


def _rope_plan(kind, q, k, rows, direction, dev, vec) -> tuple | None:
    n_tok, hq, d = _rope_dims("x", q)
    hk = k.shape[-2] if k is not None else 0
    if n_tok == 0 or hq + hk == 0 or d == 0:
        return None
    total = n_tok * (d // 2 // vec) * math.ceil((hq + hk) / _ROPE_HEADS)
    flag = np.int32(direction) if kind == "table" else np.float32(direction)
    scalars = (np.int64(n_tok), np.int32(hq), np.int32(hk), np.int32(d), np.int64(rows), flag)
    # Few items per thread (each covers 8 heads): a grid of about one item per thread, so that no thread
    # does two items while others do one (16 blocks per SM would leave 1.2 items per thread on average at
    # 16k tokens x 40 heads, i.e. a 2-item critical path).
    grid = _grid_stride(total, 256, dev, per_sm=64)
    return f"rope_{kind}_{_TYPE_NAME[q.dtype]}_v{vec}", (grid,), scalars


def _rope_table_cuda(
    q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool, k: torch.Tensor | None = None
):
    """apply_rope's kernel for q (and k in the same launch); returns yq alone when k is None."""
    yq, yk = _rope_launch("table", q, k, (cos, sin), cos.numel() // q.shape[-1], bool(backward))
    return yq if k is None else (yq, yk)


class ApplyRopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        if _runs_kernel(q):
            return _rope_table_cuda(q, cos, sin, False, k)
        return reference.rope_table_fwd(q, cos, sin), reference.rope_table_fwd(k, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = dq.contiguous(), dk.contiguous()
        if _runs_kernel(dq):
            gq, gk = _rope_table_cuda(dq, cos, sin, True, dk)
        else:
            gq, gk = reference.rope_table_bwd(dq, cos, sin), reference.rope_table_bwd(dk, cos, sin)
        return gq, gk, None, None


@_eager
def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the LLaMA / Hugging Face convention: ``x * cos + rotate_half(x) * sin``.

    q: [..., seq, heads, head_dim], k: [..., seq, kv_heads, head_dim] (the layout before the attention
    transpose); cos/sin: [seq, head_dim] (shared by the batch) or [..., seq, head_dim] (per sequence, e.g.
    from ``rope_cos_sin(position_ids)`` with positions restarting at document boundaries), same dtype as q.
    Differentiable in q and k; cos/sin are constants.
    """
    _check_float("q", q)
    _check_float("k", k, q.device)
    _check_float("cos", cos, q.device)
    _check_float("sin", sin, q.device)
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        _check_same_dtype(name, t, "q", q)
    _rope_dims("q", q)
    _rope_dims("k", k)
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have shape [{', '.join(map(str, q.shape[:-2]))}, kv_heads, {q.shape[-1]}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    _table_rows("cos", cos, q)
    _table_rows("sin", sin, q)
    if cos.shape != sin.shape:
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin must not require grad (they are treated as constants)")
    return ApplyRopeFunction.apply(q, k, cos, sin)


_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _rope_positions_cuda(
    x: torch.Tensor, positions: torch.Tensor, theta: float, sign: float, k: torch.Tensor | None = None
):
    """rope()'s kernel (angles from positions) for x (and k in the same launch); yx alone when k is None."""
    d = x.shape[-1]
    key = (d, theta, x.device)
    inv_freq = _INV_FREQ.get(key)
    if inv_freq is None:
        inv_freq = _INV_FREQ[key] = reference.rope_inv_freq(d, theta).to(x.device)
    yx, yk = _rope_launch("positions", x, k, (positions, inv_freq), positions.numel(), float(sign))
    return yx if k is None else (yx, yk)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, theta):
        ctx.save_for_backward(positions)
        ctx.theta = theta
        if _runs_kernel(x):
            return _rope_positions_cuda(x, positions, theta, 1.0)
        return reference.rope(x, positions, theta)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (positions,) = ctx.saved_tensors
        g = g.contiguous()
        if _runs_kernel(g):
            return _rope_positions_cuda(g, positions, ctx.theta, -1.0), None, None
        return reference.rope_positions_bwd(g, positions, ctx.theta), None, None


@_eager
def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embedding from integer positions, angles computed in the kernel (no cos/sin tables).

    x: [..., seq, heads, head_dim]; positions: int64 [seq] or [..., seq] (per sequence, may restart at
    document boundaries). Same convention and fp32 angles as Hugging Face's LlamaRotaryEmbedding.
    """
    _check_float("x", x)
    _check_int("positions", positions, x.device)
    _rope_dims("x", x)
    lead = tuple(x.shape[:-2])
    if tuple(positions.shape) not in {(x.shape[-3],), lead}:
        raise ValueError(
            f"positions must have shape {(x.shape[-3],)} or {lead} for x {tuple(x.shape)}, got {tuple(positions.shape)}"
        )
    if not (isinstance(theta, (int, float)) and theta > 0 and math.isfinite(theta)):
        raise ValueError(f"theta must be a finite number > 0, got {theta!r}")
    return RopeFunction.apply(x, positions, float(theta))


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    scaling=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for ``apply_rope`` from position_ids (shape positions.shape + (head_dim,));
    ``scaling``: a ``tokenmill.config.RopeScaling`` (LLaMA-3.1 frequencies) or None."""
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be an integer torch.Tensor, got {getattr(positions, 'dtype', type(positions).__name__)}"
        )
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    return reference.rope_cos_sin(positions, head_dim, theta, dtype, scaling)


# ---------------------------------------------------------------------------------------------- SwiGLU


def _swiglu_fwd_cuda(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = launch.empty(gate.shape, gate.dtype, gate.device)
    n = gate.numel()
    if n == 0:
        return y
    dev, vec = gate.device.index, _vec(gate.dtype, n, gate, up, y)
    fn, grid, scalars = _plan(
        ("swiglu_fwd", n, gate.dtype, dev, vec), lambda: _swiglu_plan("fwd", n, gate.dtype, dev, vec)
    )
    launch.launch("swiglu", fn, dev, grid, (256,), (gate, up, y, *scalars))
    return y


def _swiglu_bwd_cuda(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dg = launch.empty(gate.shape, gate.dtype, gate.device)
    du = launch.empty(up.shape, up.dtype, up.device)
    n = gate.numel()
    if n == 0:
        return dg, du
    dev, vec = gate.device.index, _vec(gate.dtype, n, dy, gate, up, dg, du)
    fn, grid, scalars = _plan(
        ("swiglu_bwd", n, gate.dtype, dev, vec), lambda: _swiglu_plan("bwd", n, gate.dtype, dev, vec)
    )
    launch.launch("swiglu", fn, dev, grid, (256,), (dy, gate, up, dg, du, *scalars))
    return dg, du


def _swiglu_plan(direction: str, n: int, dtype: torch.dtype, dev: int, vec: int) -> tuple:
    grid = _grid_stride(n // vec, 256, dev)
    return f"swiglu_{direction}_{_TYPE_NAME[dtype]}_v{vec}", (grid,), (np.int64(n),)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)  # only the inputs: sigmoid(gate) is recomputed in backward
        return _swiglu_fwd_cuda(gate, up) if _runs_kernel(gate) else reference.swiglu(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous().to(gate.dtype)
        return _swiglu_bwd_cuda(dy, gate, up) if _runs_kernel(dy) else reference.swiglu_bwd(dy, gate, up)


@_eager
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the LLaMA MLP activation); gate and up have the same shape, dtype and device."""
    _check_float("gate", gate)
    _check_float("up", up, gate.device)
    _check_same_dtype("up", up, "gate", gate)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    return SwiGLUFunction.apply(gate, up)


# ---------------------------------------------------------------------------------------------- linear CE


def _linear_ce_fwd_cuda(hidden, weight, targets, ignore_index, reduction, chunk_rows, need_gh, need_gw):
    n_tok, _ = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device.index
    counted = targets != ignore_index
    n_valid = counted.sum(dtype=torch.float32)
    scale = (
        (1.0 / n_valid) if reduction == "mean" else torch.ones((), dtype=torch.float32, device=hidden.device)
    )
    scale = scale.reshape(1).contiguous()
    losses = launch.empty((n_tok,), torch.float32, hidden.device)
    gh = launch.empty(hidden.shape, hidden.dtype, hidden.device) if need_gh else None
    gw = launch.empty(weight.shape, weight.dtype, weight.device) if need_gw else None
    if need_gw and n_tok == 0:
        gw.zero_()
    with_grad = need_gh or need_gw
    buf = torch.empty((min(chunk_rows, n_tok), vocab), dtype=hidden.dtype, device=hidden.device)
    vec = _vec(hidden.dtype, vocab, buf)
    threads = _threads_for_row(vocab, vec)
    grid_cap = launch.sm_count(dev) * max(1, 1024 // threads)  # see linear_ce.cu: rows in flight stay in L2
    fn = f"ce_rows_{_TYPE_NAME[hidden.dtype]}_v{vec}"
    for start in range(0, n_tok, chunk_rows):
        end = min(n_tok, start + chunk_rows)
        h = hidden[start:end]
        logits = buf[: end - start]
        torch.mm(h, weight.t(), out=logits)
        args = (
            logits,
            targets[start:end],
            losses[start:end],
            scale,
            np.int64(end - start),
            np.int64(vocab),
            np.int64(ignore_index),
            np.int32(with_grad),
        )
        launch.launch("linear_ce", fn, dev, min(end - start, grid_cap), threads, args)
        if need_gh:
            torch.mm(logits, weight, out=gh[start:end])
        if need_gw:
            if start == 0:
                torch.mm(logits.t(), h, out=gw)
            else:
                gw.addmm_(logits.t(), h)
    del buf
    total = losses.sum()
    loss = total / n_valid if reduction == "mean" else total
    return loss, gh, gw


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The gradients are computed in the forward pass (the logits chunk is at hand then; recomputing it in
    backward would cost a fourth matmul) and scaled by the upstream gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows, grad_enabled):
        shape = hidden.shape
        h2 = hidden.view(-1, shape[-1])
        t1 = targets.view(-1)
        # needs_input_grad is True under torch.no_grad() too: only pay for gradients when a graph is built
        need_gh = grad_enabled and ctx.needs_input_grad[0]
        need_gw = grad_enabled and ctx.needs_input_grad[1]
        fwd = _linear_ce_fwd_cuda if _runs_kernel(hidden) else reference.linear_cross_entropy_fwd
        loss, gh, gw = fwd(h2, weight, t1, ignore_index, reduction, chunk_rows, need_gh, need_gw)
        ctx.grads = (gh.view(shape) if gh is not None else None, gw)
        return loss if loss.dtype == torch.float64 else loss.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: backward called twice; the saved gradients were consumed"
            )
        gh, gw = ctx.grads
        ctx.grads = None
        # In place: the saved gradients belong to this graph only; saves a [V, H] temporary.
        if gh is not None:
            gh.mul_(grad_out.to(gh.dtype))
        if gw is not None:
            gw.mul_(grad_out.to(gw.dtype))
        return gh, gw, None, None, None, None, None


@_eager
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` without materialising the [tokens, vocab] logits.

    hidden: [..., H]; weight: [V, H] (same dtype); targets: int64 [...] (hidden's leading shape), entries in
    [0, V) or ``ignore_index``. Logits are computed chunk by chunk (``chunk_rows`` tokens at a time, default
    ``reference.default_chunk_rows``), the log-sum-exp in fp32; returns the fp32 loss ("mean" over counted
    tokens -- NaN when none is counted, as torch -- or "sum"). Differentiable in hidden and weight;
    grad_weight is accumulated chunk by chunk in weight's dtype.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight, hidden.device)
    _check_same_dtype("weight", weight, "hidden", hidden)
    _check_int("targets", targets, hidden.device)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [vocab, {hidden.shape[-1] if hidden.dim() else '?'}] to match hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), got {tuple(targets.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (vocab size 0)")
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(bad.any()):
        i = int(bad.view(-1).nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] (flattened) = {int(targets.view(-1)[i])} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )
    n_tok = targets.numel()
    if chunk_rows is None:
        chunk_rows = reference.default_chunk_rows(n_tok, vocab)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    return LinearCrossEntropyFunction.apply(
        hidden, weight, targets, ignore_index, reduction, chunk_rows, torch.is_grad_enabled()
    )


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
    """NF4 dequantisation on CUDA (kernels/nf4.cu), the layout and arithmetic of
    ``reference.nf4_dequantize``: the first ``n`` values, flat, in ``dtype`` (float32 or bfloat16).
    One thread writes 8 values (one 32-bit load of codes, one or two 16-byte stores) when 8 divides n and
    the block size; else one value per thread."""
    if dtype not in _CUDA_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be float32 or bfloat16, got {dtype}")
    for name, t, want in (
        ("packed", packed, torch.uint8),
        ("absmax_q", absmax_q, torch.uint8),
        ("absmax_scale", absmax_scale, torch.float32),
        ("absmax_offset", absmax_offset, torch.float32),
        ("levels", levels, torch.float32),
        ("code", code, torch.float32),
    ):
        if t.dtype != want or t.device != packed.device or not t.is_contiguous():
            raise ValueError(f"nf4_dequantize: {name} must be a contiguous {want} tensor on {packed.device}")
    if packed.numel() * 2 != absmax_q.numel() * block_size or n > packed.numel() * 2:
        raise ValueError(
            f"nf4_dequantize: {packed.numel()} packed bytes, {absmax_q.numel()} blocks of {block_size} "
            f"and {n} values do not agree"
        )
    out = launch.empty((n,), dtype, packed.device)
    if n == 0:
        return out
    dev = packed.device.index
    vec = 8 if n % 8 == 0 and block_size % 8 == 0 and packed.data_ptr() % 4 == 0 else 1

    def make():
        grid = _grid_stride(n // vec, 256, dev)
        return f"nf4_dequant_{_TYPE_NAME[dtype]}_v{vec}", (grid,), (np.int64(n), np.int32(block_size))

    fn, grid, scalars = _plan(("nf4", n, block_size, dtype, dev, vec), make)
    launch.launch(
        "nf4",
        fn,
        dev,
        grid,
        (256,),
        (packed, absmax_q, code, absmax_scale, absmax_offset, levels, out, *scalars),
    )
    return out
