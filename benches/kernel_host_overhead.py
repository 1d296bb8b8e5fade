"""Host-side (Python) cost of the kernel launch path, measured on CPU without a GPU.

CuPy's launch itself is replaced by a no-op and torch's stream / device queries by constants, so the figures
are what tokenmill adds on top of CuPy's own launch (a Cython call into cuLaunchKernel, a few us):
argument preparation (tensor -> device pointer), kernel and stream lookups, and, for the ops, input checks,
output allocation and grid sizing (on CPU tensors: torch.empty on CPU costs about what the CUDA caching
allocator does). Best of 5 runs of 2000 calls each; the machine is shared, so expect noise.

    .venv/bin/python benches/kernel_host_overhead.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import machine, today


class _FakeKernel:
    max_dynamic_shared_size_bytes = 0
    num_regs = 32

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        return None


def _install() -> None:
    from tokenmill.kernels import launch

    fake = _FakeKernel()

    class _Functions(dict):
        def get(self, key, default=None):
            return fake

    launch._functions = _Functions()
    launch._raw_stream = lambda device: 0
    launch._streams[(None, 0)] = object()  # CPU tensors have device index None
    launch._current_device = lambda: None
    launch.sm_count = lambda device: 132
    launch.max_shared_mem = lambda device: 227 * 1024
    launch.resident_blocks = lambda *a: 4
    from tokenmill.kernels import ops

    ops._runs_kernel = lambda t: True  # CPU tensors take the CUDA host path (checks, autograd, launches)
    from tokenmill.optim import adamw8bit

    adamw8bit._runs_kernel = lambda p: True  # and AdamW8bit's multi-tensor launch path


def per_call_us(fn, calls: int = 2000, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main() -> None:
    _install()
    from tokenmill.kernels import launch, ops

    torch.set_num_threads(1)
    x = torch.randn(4, 64)
    w = torch.randn(64)
    dy = torch.randn(4, 64)
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16)
    cos, sin = ops.rope_cos_sin(torch.arange(4), 16)
    args = (x, x, x, np.int64(x.numel()))
    _, rstd = ops._rms_norm_fwd_cuda(x, w, 1e-5)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    g, u = x.clone().requires_grad_(), x.clone().requires_grad_()
    from tokenmill.optim import AdamW8bit

    opts = {}
    for n_t in (9, 225):  # one LLaMA layer's tensors; a whole LLaMA-3-8B
        params = [torch.nn.Parameter(torch.zeros(4096)) for _ in range(n_t)]
        for p in params:
            p.grad = torch.zeros(4096)
        opts[n_t] = AdamW8bit(params, min_8bit_size=0)
        opts[n_t].step()  # state and pointer table exist: the steady state is timed
    rows = {
        "launch.launch (3 tensors + 1 scalar)": lambda: launch.launch("swiglu", "f", None, 1, 256, args),
        "prepare_args alone": lambda: launch.prepare_args(args),
        "swiglu forward host code (1 launch)": lambda: ops._swiglu_fwd_cuda(x, x),
        "rms_norm forward host code (1 launch)": lambda: ops._rms_norm_fwd_cuda(x, w, 1e-5),
        "rms_norm backward host code (2 launches)": lambda: ops._rms_norm_bwd_cuda(dy, x, w, rstd),
        "apply_rope forward host code (1 launch, q and k)": lambda: ops._rope_table_cuda(
            q, cos, sin, False, k
        ),
        # what a training step pays: public op (checks), autograd Function, forward and backward launches
        "rms_norm fwd+bwd, public op + autograd (3 launches)": lambda: torch.autograd.grad(
            ops.rms_norm(xl, wl, 1e-5), (xl, wl), dy
        ),
        "apply_rope fwd+bwd, public op + autograd (2 launches)": lambda: torch.autograd.grad(
            ops.apply_rope(ql, kl, cos, sin), (ql, kl), (dq, dk)
        ),
        "swiglu fwd+bwd, public op + autograd (2 launches)": lambda: torch.autograd.grad(
            ops.swiglu(g, u), (g, u), dy
        ),
        "AdamW8bit.step, 9 tensors (1 launch)": opts[9].step,
        "AdamW8bit.step, 225 tensors (1 launch)": opts[225].step,
    }
    print(f"{today()}  {machine()}  torch {torch.__version__}")
    print("(best of 5 x 2000 calls; CuPy's launch mocked, CPU tensors through the CUDA host path)")
    for name, fn in rows.items():
        print(f"{name:52s} {per_call_us(fn):7.2f} us/call")


if __name__ == "__main__":
    main()
