"""GPU check of tokenmill.kernels and tokenmill.optim: correctness against the references, then one table.

On the GPU machine, from the repo root (the wrapper installs the wheel without network first):

    bash benches/gpu_check.sh dist/tokenmill-*.whl          # ~4 minutes on an H100
    python benches/gpu_check.py --no-compile --tokens 4096   # quicker variants

On a CPU-only machine, ``python benches/gpu_check.py --dry-run`` runs the same host logic (inputs, reference
comparisons, timing, goal evaluation, table) on tiny shapes through the CPU reference paths.

1. Correctness: every kernel (forward and backward) against a float64 evaluation of the pure-torch
   formulas, on fresh random inputs (the seed is printed), bf16 and fp32, vectorised and scalar code paths.
   Kernel outputs are pre-filled with NaN (launch.DEBUG_FILL_NAN), so an element a kernel fails to write
   fails the check; a non-finite result never passes.
2. Performance at LLaMA-3-8B shapes (bf16, 16k tokens by default): forward+backward time, bytes moved
   (the minimum traffic of a fused implementation), achieved bandwidth, extra peak memory (peak allocated
   during the call minus what the call returns), side by side with eager torch and torch.compile, plus the
   measured device-to-device copy bandwidth; the goals of issue 6 are evaluated in the last column.
   NF4 (QLoRA base weights): dequantisation of the 14336 x 4096 FFN matrix (bytes: the 4-bit state read, bf16
   written) against the pure-torch reference, and Linear4bit forward + input gradient against a dense bf16
   layer (the overhead a fused dequant+matmul could at most remove).
   For rms_norm, rope and swiglu each implementation also gets a back-to-back time (calls issued without a
   sync) and a device time (the forward+backward captured in a CUDA graph and replayed, else the profiler's
   kernel sum): at these sizes one call is ~0.2 ms of DRAM traffic, comparable to the host's launch work,
   so the bandwidth goal is judged on device time (see TABLE_NOTE).
3. Optional trainer section: benches/gpu_train_check.py, if present (``--trainer auto|on|off``).

A section that fails is reported and the run continues; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Config:
    device: torch.device
    dry_run: bool
    tokens: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    compile: bool
    budget_s: float
    seed: int
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def make_config(args: argparse.Namespace) -> Config:
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: a thread pool only adds noise
        dev = torch.device("cpu")
        return Config(dev, True, 64, 32, 48, 4, 2, 8, 1001, args.compile_on_cpu, args.budget, args.seed)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the host logic on CPU")
    # LLaMA-3-8B: hidden 4096, ffn 14336, 32 heads / 8 KV heads of 128, vocab 128256
    return Config(
        torch.device("cuda"),
        False,
        args.tokens,
        4096,
        14336,
        32,
        8,
        128,
        128256,
        not args.no_compile,
        args.budget,
        args.seed,
    )


def sync(cfg: Config) -> None:
    if cfg.device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(cfg: Config, fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median seconds per call (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(cfg)
    if cfg.device.type == "cuda":
        events = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def back_to_back(cfg: Config, fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``calls`` calls issued back to back between two CUDA events (no sync between
    calls): the host's launch work overlaps the previous call's kernels, so this is max(host, device) time."""
    fn()
    sync(cfg)
    if cfg.device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 1e3 / calls
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def _flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat_tensors(v)]
    return []


def graph_device_time(cfg: Config, fn: Callable[[], Any], reps: int) -> tuple[float, str]:
    """Device seconds per call: ``fn`` (e.g. a forward+backward) captured in a CUDA graph and replayed
    ``reps`` times back to back, so no host work sits between the kernels. Warm-up on a side stream before
    capture, as torch's CUDA-graph notes require. Also checks that a replay into NaN-filled outputs
    reproduces an eager call bit for bit (a kernel missing from the graph, e.g. one launched on another
    stream during capture, would leave NaN); the check is returned as a note."""
    if cfg.device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    # warm-up and capture on the same side stream: per-stream caches (tokenmill's CuPy stream wrapper) are
    # filled before capture begins
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            static_out = fn()
        # the capture itself may have run work outside the graph that wrote these outputs: clear them, so
        # that only what the replay writes is compared
        for t in _flat_tensors(static_out):
            t.fill_(float("nan") if t.is_floating_point() else -1)
        graph.replay()
        torch.cuda.synchronize()
        eager_out = fn()
        torch.cuda.synchronize()
        got, want = _flat_tensors(static_out), _flat_tensors(eager_out)
        same = len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        del eager_out
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        s.record()
        for _ in range(reps):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        note = "graph replay == eager" if same else "GRAPH REPLAY DIFFERS FROM EAGER"
        return s.elapsed_time(e) / 1e3 / reps, note
    finally:
        del graph
        torch.cuda.synchronize()


def profiler_device_time(cfg: Config, fn: Callable[[], Any], reps: int) -> tuple[float, str]:
    """Device seconds per call as the sum of the kernels' (and memcpy/memset) durations seen by the CUDA
    profiler (CUPTI sees CuPy's launches too); gaps between kernels are not counted, so this is a lower bound
    of what a graph replay would take."""
    if cfg.device.type != "cuda":
        raise RuntimeError("the CUDA profiler needs a CUDA device")
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    seen: set[tuple] = set()
    total_us = 0.0
    for ev in prof.events():
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        tr = ev.time_range
        key = (ev.name, tr.start, tr.end)
        if key in seen:
            continue
        seen.add(key)
        total_us += tr.elapsed_us()
    if not seen:
        raise RuntimeError("the profiler recorded no device activity")
    return total_us / 1e6 / reps, f"profiler: {len(seen) / reps:.0f} device ops per call, gaps not counted"


DEVICE_TIMERS: dict[str, Callable[[Config, Callable[[], Any], int], tuple[float, str]]] = {
    "graph": graph_device_time,
    "profiler": profiler_device_time,
}


def device_time(cfg: Config, fn: Callable[[], Any], reps: int) -> tuple[float | None, str, str]:
    """(seconds per call or None, method, note): the first of DEVICE_TIMERS that works; each failure is
    named in the note and the next one is tried."""
    why = []
    for method, timer in DEVICE_TIMERS.items():
        try:
            t, note = timer(cfg, fn, reps)
            return t, method, "; ".join([*why, note])
        except Exception as e:  # a failed capture must not end the section
            why.append(
                f"{method} failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            )
            if cfg.device.type == "cuda":
                torch.cuda.synchronize()
    return None, "-", "; ".join(why)


def nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(nbytes(v) for v in x)
    return 0


def extra_peak(cfg: Config, fn: Callable[[], Any]) -> float | None:
    """Bytes allocated at the peak of one call beyond what existed before and what the call returns."""
    if cfg.device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    kept = nbytes(out)
    del out
    return float(max(0, peak - kept))


def free(cfg: Config) -> None:
    gc.collect()
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- peers


def hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype)


def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb for the [batch, seq, heads, dim] layout (unsqueeze_dim=2)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin


def eager_swiglu(g, u):
    return F.silu(g) * u


def eager_linear_ce(h, w, t):
    return F.cross_entropy(h @ w.t(), t)


# ---------------------------------------------------------------------------------------------- correctness


@dataclass
class Check:
    name: str
    dtype: str
    shape: str
    err: float
    tol: float
    ok: bool
    note: str = ""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error; inf when out has a non-finite element (NaN never passes)."""
    out = out.detach()
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return math.inf
    o, r = out.double(), ref.detach().double()
    denom = r.norm().item()
    diff = (o - r).norm().item()
    return diff / denom if denom > 0 else diff


def packed_positions(batch: int, seq: int, doc_len: int, device) -> torch.Tensor:
    """position_ids restarting at document boundaries (documents of varying length around doc_len)."""
    rows = []
    g = torch.Generator().manual_seed(batch * 7919 + seq)
    for _ in range(batch):
        pos, p = [], 0
        limit = int(torch.randint(doc_len // 2, doc_len + 1, (1,), generator=g))
        for _ in range(seq):
            if p >= limit:
                p = 0
                limit = int(torch.randint(doc_len // 2, doc_len + 1, (1,), generator=g))
            pos.append(p)
            p += 1
        rows.append(pos)
    return torch.tensor(rows, dtype=torch.int64, device=device)


def correctness(cfg: Config) -> list[Check]:
    from tokenmill import kernels as K
    from tokenmill import quant
    from tokenmill.kernels import launch, reference
    from tokenmill.optim import AdamW8bit

    dev = cfg.device
    out: list[Check] = []
    tol_for = {torch.bfloat16: 1.5e-2, torch.float32: 2e-5}
    small = cfg.dry_run

    def add(name, dtype, shape, pairs, tol, note=""):
        errs = [rel_err(o, r) for o, r in pairs]
        err = max(errs)
        out.append(Check(name, str(dtype).replace("torch.", ""), shape, err, tol, err <= tol, note))

    def leaf(t, dtype):
        return t.to(dtype).requires_grad_()

    def f64(t):
        return t.detach().double().requires_grad_()

    def guarded(name, dtype, shape, fn):
        try:
            fn()
        except Exception as e:  # one failing case must not hide the others
            out.append(
                Check(
                    name,
                    str(dtype).replace("torch.", ""),
                    shape,
                    math.inf,
                    0.0,
                    False,
                    f"{type(e).__name__}: {e}"[:200],
                )
            )

    launch.DEBUG_FILL_NAN = True
    try:
        for dtype in (torch.bfloat16, torch.float32):
            tol = tol_for[dtype]
            # RMSNorm: vectorised (d % 8 == 0) and scalar (d = 1000 -> 4-wide fp32 / scalar bf16; 999 -> scalar)
            for rows, d in ((8, 32), (7, 30)) if small else ((2048, 4096), (333, 1000), (65, 999)):

                def rms(rows=rows, d=d, dtype=dtype, tol=tol):
                    x, w, dy = (
                        torch.randn(rows, d, device=dev),
                        torch.randn(d, device=dev),
                        torch.randn(rows, d, device=dev),
                    )
                    xl, wl = leaf(x, dtype), leaf(w, dtype)
                    y = K.rms_norm(xl, wl, 1e-5)
                    gx, gw = torch.autograd.grad(y, (xl, wl), dy.to(dtype))
                    xr, wr = f64(xl), f64(wl)
                    yr = reference.rms_norm(xr, wr, 1e-5)
                    rx, rw = torch.autograd.grad(yr, (xr, wr), dy.to(dtype).double())
                    add("rms_norm fwd+bwd", dtype, f"{rows}x{d}", [(y, yr), (gx, rx), (gw, rw)], tol)

                guarded("rms_norm fwd+bwd", dtype, f"{rows}x{d}", rms)
            # RoPE with packed position_ids: table form (q and k) and positions form
            for b, s, h, kvh, hd in (
                ((2, 16, 4, 2, 8),) if small else ((2, 512, 32, 8, 128), (1, 37, 3, 1, 36))
            ):
                shape = f"q {b}x{s}x{h}x{hd}, k {kvh} heads"

                def rope_case(b=b, s=s, h=h, kvh=kvh, hd=hd, dtype=dtype, tol=tol, shape=shape):
                    pos = packed_positions(b, s, max(4, s // 3), dev)
                    q, k = torch.randn(b, s, h, hd, device=dev), torch.randn(b, s, kvh, hd, device=dev)
                    dq, dk = torch.randn_like(q).to(dtype), torch.randn_like(k).to(dtype)
                    cos, sin = K.rope_cos_sin(pos, hd, 500000.0, dtype)
                    ql, kl = leaf(q, dtype), leaf(k, dtype)
                    oq, ok = K.apply_rope(ql, kl, cos, sin)
                    gq, gk = torch.autograd.grad((oq, ok), (ql, kl), (dq, dk))
                    qr, kr = f64(ql), f64(kl)
                    rq, rk = reference.apply_rope(qr, kr, cos.double(), sin.double())
                    rgq, rgk = torch.autograd.grad((rq, rk), (qr, kr), (dq.double(), dk.double()))
                    add("apply_rope fwd+bwd", dtype, shape, [(oq, rq), (ok, rk), (gq, rgq), (gk, rgk)], tol)
                    pq = K.rope(ql, pos, 500000.0)
                    (pgq,) = torch.autograd.grad(pq, (ql,), dq)
                    pr = reference.rope(qr, pos, 500000.0)
                    (prg,) = torch.autograd.grad(pr, (qr,), dq.double())
                    add("rope(positions) fwd+bwd", dtype, shape, [(pq, pr), (pgq, prg)], tol)

                guarded("rope fwd+bwd", dtype, shape, rope_case)
            # SwiGLU: vectorised and an odd element count (scalar path)
            for shape2 in ((16, 48), (7, 13)) if small else ((2048, 14336), (777, 1001)):

                def sw(shape2=shape2, dtype=dtype, tol=tol):
                    g, u, dy = (torch.randn(*shape2, device=dev) * 3 for _ in range(3))
                    gl, ul = leaf(g, dtype), leaf(u, dtype)
                    y = K.swiglu(gl, ul)
                    gg, gu = torch.autograd.grad(y, (gl, ul), dy.to(dtype))
                    gr, ur = f64(gl), f64(ul)
                    yr = F.silu(gr) * ur
                    rg, ru = torch.autograd.grad(yr, (gr, ur), dy.to(dtype).double())
                    add(
                        "swiglu fwd+bwd",
                        dtype,
                        "x".join(map(str, shape2)),
                        [(y, yr), (gg, rg), (gu, ru)],
                        tol,
                    )

                guarded("swiglu fwd+bwd", dtype, "x".join(map(str, shape2)), sw)
            # Linear cross-entropy vs the unfused float64 computation, with ignored tokens, both reductions
            ce_shapes = ((40, 16, 1001, 16),) if small else ((1024, 4096, 32000, 384), (300, 64, 1001, 128))
            for tok, hid, voc, chunk in ce_shapes:
                for red in ("mean", "sum"):
                    shape = f"T{tok} H{hid} V{voc} chunk{chunk} {red}"

                    def ce(tok=tok, hid=hid, voc=voc, chunk=chunk, red=red, dtype=dtype, shape=shape):
                        h = torch.randn(tok, hid, device=dev)
                        w = torch.randn(voc, hid, device=dev) / math.sqrt(hid) * 4
                        t = torch.randint(0, voc, (tok,), device=dev)
                        t[torch.rand(tok, device=dev) < 0.1] = -100
                        hl, wl = leaf(h, dtype), leaf(w, dtype)
                        loss = K.linear_cross_entropy(hl, wl, t, reduction=red, chunk_rows=chunk)
                        gh, gw = torch.autograd.grad(loss, (hl, wl))
                        hr, wr = f64(hl), f64(wl)
                        lr_ = reference.linear_cross_entropy(hr, wr, t, reduction=red)
                        rh, rw = torch.autograd.grad(lr_, (hr, wr))
                        ce_tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                        add("linear_cross_entropy", dtype, shape, [(loss, lr_), (gh, rh), (gw, rw)], ce_tol)

                    guarded("linear_cross_entropy", dtype, shape, ce)
            # AdamW8bit: fused multi-tensor step (one launch for all five tensors, 8-bit state for all)
            # against the torch reference of the same algorithm (CPU), 5 steps: new gradient tensors in
            # steps 1-3 (new pointer table), gradients overwritten in place in steps 4-5 (cached table).
            # The last tensor is a view one element past an aligned address (the kernel's element-wise
            # path). The kernel does the reference's fp32 operations in its order (no FMA contraction,
            # IEEE sqrt and division): parameters and 8-bit state must match bit for bit.
            n = 5000 if small else 1_000_003
            sizes = (n, 300, 4097, 1, 5000)

            def adam(sizes=sizes, dtype=dtype):
                ps = [torch.nn.Parameter(torch.randn(m, device=dev).to(dtype)) for m in sizes[:-1]]
                ps.append(torch.nn.Parameter(torch.randn(sizes[-1] + 1, device=dev).to(dtype)[1:]))
                pcs = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ps]
                o = AdamW8bit(ps, lr=1e-3, min_8bit_size=0)
                oc = AdamW8bit(pcs, lr=1e-3, min_8bit_size=0)
                for step in range(5):
                    for p, pc in zip(ps, pcs):
                        g = torch.randn(p.numel()).to(dtype)
                        if step < 3:
                            p.grad, pc.grad = g.to(dev), g.clone()
                        else:
                            p.grad.copy_(g)
                            pc.grad.copy_(g)
                    o.step()
                    oc.step()
                upd, differ, total = 0.0, {}, 0
                for p, pc in zip(ps, pcs):
                    a, b = p.detach().cpu(), pc.detach()
                    upd = max(upd, ((a.double() - b.double()).abs() / (b.double().abs() + 1)).max().item())
                    differ["p"] = differ.get("p", 0) + int((a != b).sum())
                    total += a.numel()
                    sg, sc = o.state[p], oc.state[pc]
                    for name in ("state1", "state2", "absmax1", "absmax2"):
                        differ[name] = differ.get(name, 0) + int((sg[name].cpu() != sc[name]).sum())
                bad = sum(differ.values())
                ok = math.isfinite(upd) and bad == 0
                out.append(
                    Check(
                        "adamw8bit step x5",
                        str(dtype).replace("torch.", ""),
                        f"5 tensors in 1 launch, n={'+'.join(map(str, sizes))}",
                        bad / total,
                        0.0,
                        ok,
                        "elements differing from the CPU reference (must be 0): "
                        + ", ".join(f"{k} {v}" for k, v in differ.items())
                        + f"; max |dp| / (|p| + 1) {upd:.1e}",
                    )
                )

            guarded("adamw8bit step x5", dtype, f"n={'+'.join(map(str, sizes))}", adam)
            # NF4 (QLoRA base weights): the kernel's dequantisation equals the reference bit for bit (8-wide
            # and scalar paths); Linear4bit forward + input gradient against float64 math on that weight
            nf4_shapes = ((40, 96, 64), (7, 13, 6)) if small else ((14336, 4096, 64), (777, 1001, 64))
            for rows, cols, block in nf4_shapes:
                shape = f"{rows}x{cols} block {block}"

                def nf4(rows=rows, cols=cols, block=block, dtype=dtype, tol=tol, shape=shape):
                    w = torch.randn(rows, cols, device=dev) * 0.02
                    w[0, :block] = 0  # a zero block
                    q = quant.quantize_nf4(w, block)
                    levels, _, code = quant._tables(w.device)
                    args = (
                        q.packed,
                        q.absmax,
                        q.absmax_scale,
                        q.absmax_offset,
                        levels,
                        code,
                        w.numel(),
                        block,
                    )
                    got = quant.dequantize_nf4(q, dtype).view(-1)
                    differ = int((got != reference.nf4_dequantize(*args, dtype)).sum())  # NaN differs too
                    layer = quant.Linear4bit(cols, rows, block, device=dev)
                    layer.load_quantized(q)
                    x = torch.randn(64, cols, device=dev).to(dtype).requires_grad_()
                    dy = torch.randn(64, rows, device=dev).to(dtype)
                    y = layer(x)
                    (gx,) = torch.autograd.grad(y, x, dy)
                    wd = layer.dequantize(torch.float64)
                    err = max(rel_err(y, x.detach().double() @ wd.T), rel_err(gx, dy.double() @ wd))
                    out.append(
                        Check(
                            "nf4 dequant + Linear4bit",
                            str(dtype).replace("torch.", ""),
                            shape,
                            err,
                            tol,
                            differ == 0 and err <= tol,
                            f"dequantised values differing from the reference (must be 0): {differ}; "
                            "rel.err: Linear4bit fwd + input grad vs float64",
                        )
                    )

                guarded("nf4 dequant + Linear4bit", dtype, shape, nf4)
    finally:
        launch.DEBUG_FILL_NAN = False
    return out


# ---------------------------------------------------------------------------------------------- performance


@dataclass
class Row:
    op: str
    impl: str
    time_ms: float | None = None
    gbytes: float | None = None
    gbps: float | None = None
    pct_copy: float | None = None
    extra_mb: float | None = None
    speedup: float | None = None  # eager time / this time
    goal: str = ""
    note: str = ""
    b2b_ms: float | None = None  # per call, calls issued back to back (no sync between them)
    dev_ms: float | None = None  # device time per call: CUDA-graph replay (or profiler kernel sum)
    dev_method: str = ""
    dev_gbps: float | None = None
    dev_pct_copy: float | None = None
    dev_speedup: float | None = None  # eager device time / this device time


def copy_bandwidth(cfg: Config) -> float:
    n = (1 << 30) if not cfg.dry_run else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src)
    t = time_fn(cfg, lambda: dst.copy_(src), 3, 20 if not cfg.dry_run else 3)
    return 2 * n / t / 1e9


def bench_variants(
    cfg: Config,
    op: str,
    variants: dict[str, Callable[[], Any]],
    gbytes: float,
    rows: list[Row],
    warmup: int,
    reps: int,
    note: str = "",
    device: bool = False,
    b2b: bool = False,
) -> dict[str, Row]:
    """Time and measure each variant; a failing variant gets a row with the error and the rest go on.
    ``b2b``: also the back-to-back time; ``device``: that and the device time (CUDA graph replay, else
    profiler)."""
    out: dict[str, Row] = {}
    for impl, fn in variants.items():
        row = Row(op, impl, note=note)
        if impl == "torch.compile" and cfg.elapsed() > cfg.budget_s:
            row.note = f"skipped: past the {cfg.budget_s:.0f} s budget"
            rows.append(row)
            continue
        try:
            t = time_fn(cfg, fn, warmup, reps)
            row.time_ms = t * 1e3
            row.gbytes = gbytes
            row.gbps = gbytes / t
            ex = extra_peak(cfg, fn)
            row.extra_mb = None if ex is None else ex / 2**20
        except Exception as e:
            row.note = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            traceback.print_exc()
        if (device or b2b) and row.time_ms is not None:
            try:
                row.b2b_ms = back_to_back(cfg, fn, 4 * reps) * 1e3
            except Exception as e:
                row.note += f"; back-to-back failed: {type(e).__name__}: {e}"[:160]
                traceback.print_exc()
            free(cfg)
            if device and cfg.device.type == "cuda":
                dev_s, row.dev_method, dnote = device_time(cfg, fn, 2 * reps)
                if dev_s is not None:
                    row.dev_ms = dev_s * 1e3
                    row.dev_gbps = gbytes / dev_s
                row.note = "; ".join(x for x in (row.note, dnote) if x)
        rows.append(row)
        out[impl] = row
        free(cfg)
    eager = out.get("eager")
    for r in out.values():
        if eager and eager.time_ms and r.time_ms:
            r.speedup = eager.time_ms / r.time_ms
        if eager and eager.dev_ms and r.dev_ms:
            r.dev_speedup = eager.dev_ms / r.dev_ms
    return out


def bandwidth_goal(res: dict[str, Row], copy_gbps: float) -> None:
    """>= 70% of copy bandwidth on device time (launch-inclusive time when no device time could be
    measured, said in the goal); >= 2x eager on the launch-inclusive time, as a training step sees it."""
    for x in res.values():
        if x.gbps is not None:
            x.pct_copy = 100 * x.gbps / copy_gbps
        if x.dev_gbps is not None:
            x.dev_pct_copy = 100 * x.dev_gbps / copy_gbps
    r, eager = res.get("tokenmill"), res.get("eager")
    if r is None or r.gbps is None:
        return
    on_device = r.dev_pct_copy is not None
    pct = r.dev_pct_copy if on_device else r.pct_copy
    bw_ok = pct >= 70
    sp_ok = eager is not None and r.speedup is not None and r.speedup >= 2
    basis = f"device time, {r.dev_method}" if on_device else "launch-inclusive time: no device time"
    dev_sp = f", device {r.dev_speedup:.2f}x" if r.dev_speedup else ""
    r.goal = (
        f"{'MET' if bw_ok and sp_ok else 'MISSED'} (>=70% copy BW: {'yes' if bw_ok else 'no'} "
        f"[{pct:.0f}% on {basis}], >=2x eager: {'yes' if sp_ok else 'no'} "
        f"[{fmt(r.speedup, '.2f')}x launch-inclusive{dev_sp}])"
    )


def maybe_compile(cfg: Config, fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def perf(cfg: Config, copy_gbps: float) -> list[Row]:
    from tokenmill import kernels as K
    from tokenmill.kernels import reference
    from tokenmill.optim import AdamW8bit

    dev, dt = cfg.device, torch.bfloat16
    T, H, FF = cfg.tokens, cfg.hidden, cfg.ffn
    e = 2  # bytes per bf16 element
    rows: list[Row] = []

    def guarded(section: str, body: Callable[[], None]) -> None:
        """Run one section; a failure becomes a row and the next section goes on."""
        try:
            body()
        except Exception as ex:
            rows.append(Row(section, "-", note=f"FAILED {type(ex).__name__}: {ex}"[:160]))
            traceback.print_exc()
        free(cfg)

    light = dict(warmup=3, reps=10) if not cfg.dry_run else dict(warmup=1, reps=2)

    def with_compile(variants: dict[str, Callable], compiled: Callable | None) -> dict[str, Callable]:
        if cfg.compile and compiled is not None:
            variants["torch.compile"] = compiled
        return variants

    # --- RMSNorm fwd+bwd
    section = "rms_norm fwd+bwd"

    def run_section() -> None:
        x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
        w = (1 + 0.1 * torch.randn(H, device=dev)).to(dt).requires_grad_()
        dy = torch.randn(T, H, device=dev, dtype=dt)
        comp = maybe_compile(cfg, hf_rms_norm) if cfg.compile else None
        variants = {
            "tokenmill": lambda: torch.autograd.grad(K.rms_norm(x, w, 1e-5), (x, w), dy),
            "eager": lambda: torch.autograd.grad(hf_rms_norm(x, w, 1e-5), (x, w), dy),
        }
        with_compile(variants, (lambda: torch.autograd.grad(comp(x, w, 1e-5), (x, w), dy)) if comp else None)
        res = bench_variants(
            cfg, section, variants, 5 * T * H * e / 1e9, rows, **light, note=f"x [{T}, {H}]", device=True
        )
        bandwidth_goal(res, copy_gbps)

    guarded(section, run_section)

    # --- RoPE fwd+bwd (q and k, packed position_ids)
    section = "rope fwd+bwd"

    def run_section() -> None:
        b, s = 1, T
        hq, hk, hd = cfg.heads, cfg.kv_heads, cfg.head_dim
        q = torch.randn(b, s, hq, hd, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(b, s, hk, hd, device=dev, dtype=dt, requires_grad=True)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        pos = packed_positions(b, s, min(s, 2048), dev)
        cos, sin = K.rope_cos_sin(pos, hd, 500000.0, dt)
        comp = maybe_compile(cfg, hf_apply_rope) if cfg.compile else None
        variants = {
            "tokenmill": lambda: torch.autograd.grad(K.apply_rope(q, k, cos, sin), (q, k), (dq, dk)),
            "tokenmill rope(positions)": lambda: torch.autograd.grad(
                (K.rope(q, pos, 500000.0), K.rope(k, pos, 500000.0)), (q, k), (dq, dk)
            ),
            "eager": lambda: torch.autograd.grad(hf_apply_rope(q, k, cos, sin), (q, k), (dq, dk)),
        }
        with_compile(
            variants, (lambda: torch.autograd.grad(comp(q, k, cos, sin), (q, k), (dq, dk))) if comp else None
        )
        gb = (4 * (q.numel() + k.numel()) * e + 4 * cos.numel() * e) / 1e9  # q, k in+out twice; cos+sin twice
        res = bench_variants(
            cfg,
            section,
            variants,
            gb,
            rows,
            **light,
            note=f"q [{b}, {s}, {hq}, {hd}], k {hk} heads",
            device=True,
        )
        bandwidth_goal(res, copy_gbps)

    guarded(section, run_section)

    # --- SwiGLU fwd+bwd
    section = "swiglu fwd+bwd"

    def run_section() -> None:
        g = torch.randn(T, FF, device=dev, dtype=dt, requires_grad=True)
        u = torch.randn(T, FF, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(T, FF, device=dev, dtype=dt)
        comp = maybe_compile(cfg, eager_swiglu) if cfg.compile else None
        variants = {
            "tokenmill": lambda: torch.autograd.grad(K.swiglu(g, u), (g, u), dy),
            "eager": lambda: torch.autograd.grad(eager_swiglu(g, u), (g, u), dy),
        }
        with_compile(variants, (lambda: torch.autograd.grad(comp(g, u), (g, u), dy)) if comp else None)
        res = bench_variants(
            cfg,
            section,
            variants,
            8 * T * FF * e / 1e9,
            rows,
            **light,
            note=f"gate, up [{T}, {FF}]",
            device=True,
        )
        bandwidth_goal(res, copy_gbps)

    guarded(section, run_section)

    # --- Linear cross-entropy fwd+bwd (memory is the point)
    section = "linear_cross_entropy fwd+bwd"

    def run_section() -> None:
        V = cfg.vocab
        chunk = reference.default_chunk_rows(T, V)
        h = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
        w = (torch.randn(V, H, device=dev) / math.sqrt(H)).to(dt).requires_grad_()
        t = torch.randint(0, V, (T,), device=dev)
        t[::17] = -100
        comp = maybe_compile(cfg, eager_linear_ce) if cfg.compile else None
        variants = {
            "tokenmill": lambda: torch.autograd.grad(K.linear_cross_entropy(h, w, t), (h, w)),
            # a bigger chunk: fewer read-modify-write passes over grad_weight, twice the logits buffer
            "tokenmill chunk 2x": lambda: torch.autograd.grad(
                K.linear_cross_entropy(h, w, t, chunk_rows=2 * chunk), (h, w)
            ),
            "eager": lambda: torch.autograd.grad(eager_linear_ce(h, w, t), (h, w)),
        }
        with_compile(variants, (lambda: torch.autograd.grad(comp(h, w, t), (h, w))) if comp else None)
        flops = 6 * T * H * V
        heavy = dict(warmup=1, reps=3) if not cfg.dry_run else dict(warmup=1, reps=2)
        gb = 2 * (T * H + V * H) * e / 1e9  # read inputs, write their gradients
        res = bench_variants(
            cfg, section, variants, gb, rows, **heavy, note=f"T {T}, H {H}, V {V}, chunk {chunk}"
        )
        for r in res.values():
            if r.time_ms:
                r.note += f"; {flops / (r.time_ms / 1e3) / 1e12:.0f} TFLOP/s"
        r, eager = res.get("tokenmill"), res.get("eager")
        if r and eager and r.time_ms and eager.time_ms:
            mem_ok = (
                r.extra_mb is not None and eager.extra_mb is not None and r.extra_mb <= eager.extra_mb / 10
            )
            t_ok = r.time_ms <= eager.time_ms
            mem_ratio = (
                f"{eager.extra_mb / max(r.extra_mb, 1e-9):.1f}x less"
                if (r.extra_mb and eager.extra_mb)
                else "n/a on CPU"
            )
            r.goal = f"{'MET' if mem_ok and t_ok else 'MISSED'} (extra mem <= 1/10 eager: {'yes' if mem_ok else 'no'} [{mem_ratio}], time <= 1.0x eager: {'yes' if t_ok else 'no'})"

    guarded(section, run_section)

    # --- AdamW8bit step vs torch's fused AdamW (fp32 params of one LLaMA-3-8B layer + a norm)
    section = "AdamW step"

    def run_section() -> None:
        kv = cfg.kv_heads * cfg.head_dim
        shapes = [(H, H), (kv, H), (kv, H), (H, H), (FF, H), (FF, H), (H, FF), (H,), (H,)]
        p8 = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in shapes]
        pt = [torch.nn.Parameter(p.detach().clone()) for p in p8]
        for a, b_ in zip(p8, pt):
            a.grad = torch.randn_like(a) * 1e-3
            b_.grad = a.grad.clone()
        n_params = sum(p.numel() for p in p8)
        o8 = AdamW8bit(p8, lr=1e-4, min_8bit_size=0 if cfg.dry_run else 4096)
        fused_ok = dev.type == "cuda"
        ot = torch.optim.AdamW(pt, lr=1e-4, fused=fused_ok)
        variants = {"tokenmill": o8.step, "eager": ot.step}
        light_adam = dict(warmup=2, reps=10) if not cfg.dry_run else dict(warmup=1, reps=2)
        gb8 = n_params * (3 * 4 + 4) / 1e9  # p r/w, g r (fp32) + two uint8 moments r/w
        res = bench_variants(
            cfg,
            section,
            variants,
            gb8,
            rows,
            **light_adam,
            note=f"{n_params / 1e6:.0f}M fp32 params",
            b2b=True,  # steps back to back: the host's ~0.05-0.1 ms of step() preparation overlaps
        )
        if "eager" in res:
            res["eager"].impl = "torch AdamW" + (" fused" if fused_ok else " (CPU)")
            res["eager"].gbytes = n_params * (3 * 4 + 4 * 4) / 1e9
            if res["eager"].time_ms:
                res["eager"].gbps = res["eager"].gbytes / (res["eager"].time_ms / 1e3)
        bytes8 = o8.state_bytes() / n_params
        bytes_t = (
            sum(
                nbytes(list(v for v in st.values() if isinstance(v, torch.Tensor) and v.numel() > 1))
                for st in ot.state.values()
            )
            / n_params
        )
        r, eager = res.get("tokenmill"), res.get("eager")
        for x in res.values():
            if x.gbps is not None:
                x.pct_copy = 100 * x.gbps / copy_gbps
        if r and eager and r.time_ms and eager.time_ms:
            ratio = r.time_ms / eager.time_ms
            ok = bytes8 <= 2.1 and ratio <= 1.2
            b2b_ratio = f", back to back {r.b2b_ms / eager.b2b_ms:.2f}x" if r.b2b_ms and eager.b2b_ms else ""
            r.goal = f"{'MET' if ok else 'MISSED'} ({bytes8:.3f} B state/param <= 2.1: {'yes' if bytes8 <= 2.1 else 'no'}; {ratio:.2f}x fused AdamW time <= 1.2: {'yes' if ratio <= 1.2 else 'no'}{b2b_ratio})"
            eager.note += f"; {bytes_t:.1f} B state/param"

    guarded(section, run_section)

    # --- NF4 dequantisation (QLoRA base weight, the LLaMA-3-8B FFN matrix) and its cost inside a layer
    section = "nf4 dequant"

    def run_section() -> None:
        from tokenmill import quant

        q = quant.quantize_nf4(torch.randn(FF, H, device=dev) * 0.02)
        levels, _, code = quant._tables(dev)
        args = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset, levels, code, FF * H, q.block_size)
        comp = maybe_compile(cfg, reference.nf4_dequantize) if cfg.compile else None
        variants = {
            "tokenmill": lambda: quant.dequantize_nf4(q, dt),
            "eager": lambda: reference.nf4_dequantize(*args, dt),
        }
        with_compile(variants, (lambda: comp(*args, dt)) if comp else None)
        gb = (q.nbytes + FF * H * e) / 1e9  # read the 4-bit state, write bf16
        res = bench_variants(
            cfg, section, variants, gb, rows, **light, note=f"W [{FF}, {H}] -> bf16", device=True
        )
        bandwidth_goal(res, copy_gbps)

    guarded(section, run_section)

    # Linear4bit forward + input gradient (dequantised twice) against the same matmuls on a dense bf16
    # weight: the time a fused dequant+matmul kernel could at most win back.
    section = "Linear4bit fwd+bwd"

    def run_section() -> None:
        from tokenmill import quant

        dense = torch.nn.Linear(H, FF, bias=False, device=dev, dtype=dt).requires_grad_(False)
        layer = quant.Linear4bit.from_linear(dense)
        x = torch.randn(T, H, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(T, FF, device=dev, dtype=dt)
        w16 = layer.dequantize(dt)
        variants = {
            "tokenmill": lambda: torch.autograd.grad(layer(x), (x,), dy),
            "eager": lambda: torch.autograd.grad(F.linear(x, w16), (x,), dy),
        }
        res = bench_variants(
            cfg,
            section,
            variants,
            0.0,
            rows,
            **light,
            note=f"x [{T}, {H}] @ W^T [{H}, {FF}]; eager = dense bf16 W",
        )
        r, eager = res.get("tokenmill"), res.get("eager")
        if r and eager and r.time_ms and eager.time_ms:
            r.goal = f"dequantisation overhead {r.time_ms / eager.time_ms - 1:+.1%} of a dense bf16 layer"
        for x_ in res.values():
            x_.gbytes = x_.gbps = None

    guarded(section, run_section)
    return rows


def launch_overhead(cfg: Config) -> str:
    """Host time per call: the whole op (K.swiglu on a tiny tensor: checks, output allocation, autograd
    Function, launch) with raw-pointer arguments (the default) and with DLPack arguments, launch.launch
    alone (the bare kernel launch path) with pointers, and forward+backward of rms_norm and apply_rope
    (ours and eager torch's) on tiny tensors."""
    import numpy as np
    from tokenmill import kernels as K
    from tokenmill.kernels import launch

    on_gpu = cfg.device.type == "cuda"
    g = torch.randn(1024, device=cfg.device, dtype=torch.bfloat16)
    y = torch.empty_like(g)
    res = {}

    def per_call(fn) -> float:
        fn()
        sync(cfg)
        t = time.perf_counter()
        for _ in range(500 if on_gpu else 20):
            fn()
        sync(cfg)
        return (time.perf_counter() - t) / (500 if on_gpu else 20) * 1e6

    saved = launch.ARGS_VIA_POINTERS
    try:
        if on_gpu:  # on CPU (dry run) the ops below take the reference paths: only the Python is exercised
            for mode in (True, False):
                launch.ARGS_VIA_POINTERS = mode
                res["swiglu op, pointer" if mode else "swiglu op, dlpack"] = per_call(lambda: K.swiglu(g, g))
            launch.ARGS_VIA_POINTERS = True
            args = (g, g, y, np.int64(g.numel()))
            dev = cfg.device.index or 0
            res["launch.launch alone"] = per_call(
                lambda: launch.launch("swiglu", "swiglu_fwd_bf16_v8", dev, 1, 256, args)
            )
        # forward+backward of the ops whose full-size device time is ~0.2 ms: the host time per call that
        # the launch-inclusive column pays (tiny tensors, so the device work is negligible)
        bf = torch.bfloat16
        x = torch.randn(4, 4096, device=cfg.device, dtype=bf, requires_grad=True)
        w = torch.ones(4096, device=cfg.device, dtype=bf, requires_grad=True)
        dy = torch.randn_like(x)
        q = torch.randn(1, 4, 32, 128, device=cfg.device, dtype=bf, requires_grad=True)
        k = torch.randn(1, 4, 8, 128, device=cfg.device, dtype=bf, requires_grad=True)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        cos, sin = K.rope_cos_sin(torch.arange(4, device=cfg.device)[None], 128, 500000.0, bf)
        res["rms_norm fwd+bwd"] = per_call(lambda: torch.autograd.grad(K.rms_norm(x, w), (x, w), dy))
        res["eager rms_norm fwd+bwd"] = per_call(
            lambda: torch.autograd.grad(hf_rms_norm(x, w, 1e-6), (x, w), dy)
        )
        res["apply_rope fwd+bwd"] = per_call(
            lambda: torch.autograd.grad(K.apply_rope(q, k, cos, sin), (q, k), (dq, dk))
        )
        res["eager rope fwd+bwd"] = per_call(
            lambda: torch.autograd.grad(hf_apply_rope(q, k, cos, sin), (q, k), (dq, dk))
        )
    finally:
        launch.ARGS_VIA_POINTERS = saved
    text = ", ".join(f"{k} {v:.1f} us/call" for k, v in res.items())
    return text if on_gpu else f"dry run (CPU reference paths): {text}"


# ---------------------------------------------------------------------------------------------- output


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], copy_gbps: float, device_name: str) -> None:
    print(f"\n## tokenmill kernels on {device_name}: device-to-device copy bandwidth {copy_gbps:.0f} GB/s\n")
    head = [
        "op",
        "impl",
        "time ms",
        "b2b ms",
        "device ms",
        "GB moved",
        "GB/s",
        "% copy BW",
        "dev GB/s",
        "dev % copy BW",
        "extra peak MiB",
        "speedup vs eager",
        "goal",
        "note",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r.op,
            r.impl,
            fmt(r.time_ms, ".3f"),
            fmt(r.b2b_ms, ".3f"),
            fmt(r.dev_ms, ".3f") + (f" ({r.dev_method})" if r.dev_ms is not None else ""),
            fmt(r.gbytes, ".3f"),
            fmt(r.gbps, ".0f"),
            fmt(r.pct_copy, ".0f"),
            fmt(r.dev_gbps, ".0f"),
            fmt(r.dev_pct_copy, ".0f"),
            fmt(r.extra_mb, ".0f"),
            fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
            r.goal,
            r.note,
        ]
        print("| " + " | ".join(cells) + " |")
    print(TABLE_NOTE)


TABLE_NOTE = """
time ms: median of single calls, each between two CUDA events; it includes the host's launch latency
(Python, autograd, CuPy launches), during which the GPU may idle. b2b ms: calls issued back to back
between two events (no sync), i.e. max(host, device) per call. device ms: the forward+backward captured in
a CUDA graph and replayed back to back ("graph"; the replay is also checked against an eager call), or,
when capture fails, the sum of kernel durations from torch.profiler ("profiler", gaps not counted).
GB/s and % copy BW use time ms; dev GB/s and dev % copy BW use device ms. Goals: the >=70% copy-bandwidth
goal is evaluated on device time, the >=2x eager goal on time ms (launch-inclusive, as a step sees it)."""


def run_trainer_hook(mode: str) -> tuple[str, bool]:
    hook = HERE / "gpu_train_check.py"
    if mode == "off":
        return "trainer section: off", True
    if not hook.exists():
        return f"trainer section: {hook.name} not present" + (
            " (requested with --trainer on)" if mode == "on" else ""
        ), mode != "on"
    print(f"\n== trainer section: {hook}", flush=True)
    try:
        r = subprocess.run([sys.executable, str(hook)], timeout=600)
        return f"trainer section: exit status {r.returncode}", r.returncode == 0
    except subprocess.TimeoutExpired:
        return "trainer section: timed out after 600 s", False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes through the reference paths")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step for the performance shapes")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--compile-on-cpu", action="store_true", help="with --dry-run: include torch.compile")
    ap.add_argument(
        "--budget", type=float, default=170.0, help="seconds after which torch.compile variants are skipped"
    )
    ap.add_argument("--seed", type=int, default=None, help="seed for the random inputs (default: fresh)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-perf", action="store_true")
    ap.add_argument(
        "--trainer",
        choices=("auto", "on", "off"),
        default="auto",
        help="run benches/gpu_train_check.py (auto: if present)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(args.seed)
    cfg = make_config(args)
    import tokenmill

    device_name = torch.cuda.get_device_name() if cfg.device.type == "cuda" else "CPU (dry run)"
    print(
        f"tokenmill {tokenmill.__version__} from {Path(tokenmill.__file__).parent}; torch {torch.__version__}; device {device_name}; seed {args.seed}",
        flush=True,
    )
    try:
        import cupy

        print(f"cupy {cupy.__version__}", flush=True)
    except Exception as e:
        print(f"cupy unavailable: {e}", flush=True)
    all_ok = True
    checks: list[Check] = []
    if not args.skip_correctness:
        print("\n== correctness (kernels vs float64 references; outputs pre-filled with NaN)", flush=True)
        try:
            checks = correctness(cfg)
        except Exception as e:
            traceback.print_exc()
            checks = [
                Check("correctness section", "-", "-", math.inf, 0.0, False, f"{type(e).__name__}: {e}"[:200])
            ]
        for c in checks:
            status = "PASS" if c.ok else "FAIL"
            print(
                f"{status}  {c.name:26s} {c.dtype:9s} {c.shape:38s} rel.err {c.err:.2e} (tol {c.tol:.0e}) {c.note}",
                flush=True,
            )
        all_ok &= all(c.ok for c in checks)
        print(
            f"correctness: {sum(c.ok for c in checks)}/{len(checks)} passed  [{cfg.elapsed():.0f} s]",
            flush=True,
        )
    rows: list[Row] = []
    copy_gbps = float("nan")
    overhead = ""
    if not args.skip_perf:
        print("\n== performance", flush=True)
        try:
            copy_gbps = copy_bandwidth(cfg)
        except Exception as e:
            traceback.print_exc()
            print(f"copy bandwidth failed: {e}")
        try:
            overhead = launch_overhead(cfg)
        except Exception as e:
            overhead = f"failed: {e}"
        rows = perf(cfg, copy_gbps)
        print_table(rows, copy_gbps, device_name)
        print(f"\nhost time per call: {overhead}")
        all_ok &= not any(r.note.startswith("FAILED") for r in rows)
    msg, ok = run_trainer_hook(args.trainer)
    print(msg)
    all_ok &= ok
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "seed": args.seed,
                    "copy_gbps": copy_gbps,
                    "launch_overhead": overhead,
                    "checks": [asdict(c) for c in checks],
                    "rows": [asdict(r) for r in rows],
                },
                indent=1,
                default=str,
            )
        )
    print(f"\ntotal {cfg.elapsed():.0f} s; {'all checks passed' if all_ok else 'SOME CHECKS FAILED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
