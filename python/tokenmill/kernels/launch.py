"""Run-time compilation and launch of the CUDA sources in this folder through CuPy.

* Each ``*.cu`` file is compiled once per device with NVRTC (``cupy.RawModule``) and cached.
* Kernels run on torch's *current* stream (wrapped as a ``cupy.cuda.ExternalStream``), so they order
  correctly with torch work.
* CUDA-graph capture: after a first (warm-up) call of an op, its launch path makes no CUDA call that capture
  forbids: no synchronisation, no allocation through CuPy (outputs come from torch.empty, tensors pass as raw
  pointers), no host-to-device copies; compilation, device queries (cached), the CuPy wrapper of a new
  stream (a plain Python object) and CuPy's once-per-host-thread context check (cudaMemGetInfo, also on the
  autograd engine's backward thread) happen on first use. rms_norm, rope and swiglu forward+backward are
  captured this way by benches/gpu_check.py. Not capturable: linear_cross_entropy (it validates targets
  with a host sync) and AdamW8bit's first step or a step whose tensors changed (pointer-table upload).
* Tensors reach the kernels as raw device pointers (kernels take raw pointers; DLPack is an opt-in
  alternative, see ARGS_VIA_POINTERS).
* CuPy allocates from torch's caching allocator, so the two memory pools do not starve each other.
* ``nvrtc_compile`` compiles a source for an explicit architecture without any GPU (used by the tests).

Set ``launch.DEBUG_FILL_NAN = True`` to pre-fill every kernel output with NaN (integers with -1): a check
that each kernel writes every element of its outputs (benches/gpu_check.py does this).
"""

from __future__ import annotations

import functools
import glob
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("rms_norm", "rope", "swiglu", "linear_ce", "adamw8bit", "nf4")
DEBUG_FILL_NAN = False
# Tensors reach kernels as raw device pointers (numpy uint64). TOKENMILL_KERNEL_ARGS=dlpack passes
# DLPack-imported CuPy arrays instead: same memory, but the first H100 run measured 239 us of host time per
# launch that way against 71.5 us with pointers (benches/gpu_check.py measures both).
ARGS_VIA_POINTERS = os.environ.get("TOKENMILL_KERNEL_ARGS", "pointer") != "dlpack"
_PTR = np.uint64
_NULL = np.uint64(0)

_lock = threading.Lock()
_modules: dict[tuple[str, int], Any] = {}
_functions: dict[tuple[str, str, int], Any] = {}
_streams: dict[tuple[int, int], Any] = {}
_allocator_set = False
_own_bf16: bool | None = None  # True once cuda_bf16.h turned out unusable with this NVRTC


def cuda_include_dirs() -> list[str]:
    """Directories holding cuda_bf16.h: CUDA_PATH/CUDA_HOME, the NVIDIA pip wheels, /usr/local/cuda."""
    candidates: list[str] = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    for base in sys.path:
        nv = os.path.join(base, "nvidia")
        if os.path.isdir(nv):
            # cu13 wheels: nvidia/cu13/include; cu12 wheels: nvidia/cuda_runtime/include, nvidia/cuda_nvcc/include
            candidates += sorted(glob.glob(os.path.join(nv, "*", "include")))
    candidates += ["/usr/local/cuda/include", "/usr/include"]
    out: list[str] = []
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_bf16.h")) and c not in out:
            out.append(c)
    return out


def _options(own_bf16: bool) -> tuple[str, ...]:
    opts = ["--std=c++17", f"-I{KERNEL_DIR}"]
    if own_bf16:
        opts.append("-DTM_OWN_BF16")
    else:
        opts += [f"-I{d}" for d in cuda_include_dirs()[:1]]
    return tuple(opts)


def source(name: str) -> str:
    """The text of ``<name>.cu`` with ``#include "common.cuh"`` expanded in place, so that CuPy's on-disk
    kernel cache (keyed by the source text and options) sees every change."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; known: {', '.join(SOURCES)}")
    text = (KERNEL_DIR / f"{name}.cu").read_text()
    return text.replace('#include "common.cuh"', (KERNEL_DIR / "common.cuh").read_text(), 1)


def nvrtc_compile(name: str, arch: str = "sm_90", own_bf16: bool = False) -> bytes:
    """Compile ``<name>.cu`` to a cubin for ``arch`` with NVRTC; needs no GPU. Raises RuntimeError with the log."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source(name), f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *_options(own_bf16)])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(
                f"NVRTC failed on {name}.cu for {arch}: {e}\n{nvrtc.getProgramLog(prog)}"
            ) from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ---------------------------------------------------------------------------------------------- allocator


class _TorchBlock:
    """Owner of a block from torch's caching allocator; frees it when CuPy drops the memory."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        torch.cuda.caching_allocator_delete(self.ptr)


def _torch_alloc(size: int):
    import cupy

    device = cupy.cuda.Device().id
    if size == 0:
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(0, 0, None, device), 0)
    stream = torch.cuda.current_stream(device)
    ptr = torch.cuda.caching_allocator_alloc(size, device, stream)
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device), 0)


def use_torch_allocator() -> None:
    """Route CuPy's device allocations through torch's caching allocator (idempotent)."""
    global _allocator_set
    if _allocator_set:
        return
    import cupy

    cupy.cuda.set_allocator(_torch_alloc)
    _allocator_set = True


# ---------------------------------------------------------------------------------------------- modules


def _compile_module(name: str, device: int):
    import cupy

    global _own_bf16
    with cupy.cuda.Device(device):
        if _own_bf16 is not True:
            try:
                mod = cupy.RawModule(code=source(name), options=_options(False), backend="nvrtc")
                _compile_now(mod)  # so that a header problem shows up here
                _own_bf16 = False
                return mod
            except cupy.cuda.compiler.CompileException:
                if _own_bf16 is False:  # the header worked for another source: a real error
                    raise
                _own_bf16 = True  # e.g. headers from another CUDA release than this NVRTC
        mod = cupy.RawModule(code=source(name), options=_options(True), backend="nvrtc")
        _compile_now(mod)
        return mod


def _compile_now(mod) -> None:
    if hasattr(mod, "compile"):
        mod.compile()
    else:  # older CuPy compiles on first access to .module
        _ = mod.module


def kernel(source_name: str, function: str, device: int):
    """The compiled function ``function`` from ``<source_name>.cu`` for ``device`` (compiled once)."""
    fkey = (source_name, function, device)
    fn = _functions.get(fkey)
    if fn is not None:
        return fn
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "tokenmill.kernels runs CUDA tensors through CuPy: pip install cupy-cuda12x (or cupy-cuda13x)"
        ) from e
    key = (source_name, device)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            use_torch_allocator()
            mod = _compile_module(source_name, device)
            _modules[key] = mod
        fn = _functions[fkey] = mod.get_function(function)
    return fn


def _raw_stream_fallback(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# torch's current stream as a raw pointer without building a torch.cuda.Stream object (~0.2 us instead of
# several us); the public call is the fallback for a torch without the private binding.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _raw_stream_fallback


def _stream(device: int):
    """CuPy stream object for torch's current stream of ``device`` (cached per (device, pointer))."""
    ptr = _raw_stream(device)
    s = _streams.get((device, ptr))
    if s is None:
        import cupy

        if ptr == 0:  # torch's default stream is the legacy NULL stream
            s = cupy.cuda.Stream.null
        else:
            try:
                s = cupy.cuda.ExternalStream(ptr, device)
            except TypeError:  # CuPy < 12 takes no device id
                s = cupy.cuda.ExternalStream(ptr)
        _streams[(device, ptr)] = s
    return s


def _dlpack(t: torch.Tensor) -> Any:
    import cupy

    t = t.detach()
    if t.dtype == torch.bfloat16:  # CuPy has no bfloat16 dtype; the kernel sees the same bytes
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)


_SCALAR_TYPES = frozenset(
    {np.int32, np.int64, np.uint64, np.float32, np.float64, np.uint32, np.int8, np.uint8}
)


def prepare_args(args: Sequence[Any]) -> tuple[Any, ...]:
    """Kernel arguments as CuPy takes them: tensors -> device pointers (numpy uint64), None -> NULL, numpy
    scalars unchanged. Anything else is a ValueError (a Python int or float has no fixed C size)."""
    out = []
    for a in args:
        t = type(a)  # exact-type tests first: isinstance walks the MRO, ~20 arguments per op on the hot path
        if t is torch.Tensor:
            out.append(_PTR(a.data_ptr()) if ARGS_VIA_POINTERS else _dlpack(a))
        elif t in _SCALAR_TYPES:
            out.append(a)
        elif a is None:
            out.append(_NULL)
        elif isinstance(a, torch.Tensor):  # nn.Parameter and other subclasses
            out.append(_PTR(a.data_ptr()) if ARGS_VIA_POINTERS else _dlpack(a))
        elif isinstance(a, np.generic):
            out.append(a)
        else:
            raise ValueError(
                f"kernel argument of type {type(a).__name__}: pass a tensor, None or a numpy scalar of the "
                "kernel parameter's type"
            )
    return tuple(out)


def _current_device() -> int:
    from cupy.cuda import runtime

    return runtime.getDevice()


def launch(
    source_name: str,
    function: str,
    device: int,
    grid: int | tuple[int, ...],
    block: int | tuple[int, ...],
    args: Sequence[Any],
    shared_mem: int = 0,
) -> None:
    """Launch on torch's current stream of ``device``. Tensors are passed as raw device pointers (or DLPack
    arrays with TOKENMILL_KERNEL_ARGS=dlpack); scalars must already be numpy scalars of the kernel's
    parameter types.

    The hot path is a few dict lookups, one numpy scalar per tensor and CuPy's launch: no stream or device
    context managers (the stream goes to the launch call, the device is switched only when it differs)."""
    fn = _functions.get((source_name, function, device))
    if fn is None:
        fn = kernel(source_name, function, device)
    grid = grid if isinstance(grid, tuple) else (int(grid),)
    block = block if isinstance(block, tuple) else (int(block),)
    stream = _stream(device)
    if ARGS_VIA_POINTERS:
        cargs = prepare_args(args)
    else:  # DLPack exchange is ordered on CuPy's current stream
        with stream:
            cargs = prepare_args(args)
    if shared_mem > 48 * 1024 and fn.max_dynamic_shared_size_bytes < shared_mem:
        fn.max_dynamic_shared_size_bytes = shared_mem
    if _current_device() == device:
        fn(grid, block, cargs, shared_mem=shared_mem, stream=stream)
    else:
        import cupy

        with cupy.cuda.Device(device):
            fn(grid, block, cargs, shared_mem=shared_mem, stream=stream)


def empty(shape: Sequence[int] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (torch's allocator); NaN/-1 filled when DEBUG_FILL_NAN is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if DEBUG_FILL_NAN:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@functools.cache
def sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def resident_blocks(source_name: str, function: str, device: int, threads: int) -> int:
    """Blocks of ``threads`` threads of a kernel that fit on one SM at once, from its register count (the
    kernels here use little shared memory); at least 1. A grid-stride kernel launched with
    ``sm_count * resident_blocks`` blocks runs in one wave, so no block waits for another to finish."""
    fn = kernel(source_name, function, device)
    try:
        regs = max(1, int(fn.num_regs))
    except (AttributeError, TypeError):  # an older CuPy: assume the worst case allowed by launch bounds
        regs = 255
    regs = -(-regs // 8) * 8  # allocation granularity
    return max(1, min(2048 // threads, 32, 65536 // (regs * threads)))


@functools.cache
def max_shared_mem(device: int) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
