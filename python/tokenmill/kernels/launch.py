"""Run-time compilation and launch of the CUDA sources in this folder through CuPy.

* Each ``*.cu`` file is compiled once per device with NVRTC (``cupy.RawModule``) and cached.
* Kernels run on torch's *current* stream (wrapped as a ``cupy.cuda.ExternalStream``), so they order
  correctly with torch work, CUDA graphs aside.
* Tensors cross to CuPy through DLPack without copies (bf16 travels as an int16 view: kernels take raw
  pointers, and CuPy has no bfloat16 dtype).
* CuPy allocates from torch's caching allocator, so the two memory pools do not starve each other.
* ``nvrtc_compile`` compiles a source for an explicit architecture without any GPU (used by the tests).

Set ``launch.DEBUG_FILL_NAN = True`` to pre-fill every kernel output with NaN (integers with -1): a check
that each kernel writes every element of its outputs (benches/gpu_check.py does this).
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = ("rms_norm", "rope", "swiglu", "linear_ce", "adamw8bit")
DEBUG_FILL_NAN = False
# Tensors reach kernels as DLPack-imported CuPy arrays (zero copy). TOKENMILL_KERNEL_ARGS=pointer passes raw
# device pointers instead (same memory, less host overhead per launch; benches/gpu_check.py measures both).
ARGS_VIA_POINTERS = os.environ.get("TOKENMILL_KERNEL_ARGS", "dlpack") == "pointer"

_lock = threading.Lock()
_modules: dict[tuple[str, int], Any] = {}
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
                mod.compile()  # now, so that a header problem shows up here
                _own_bf16 = False
                return mod
            except cupy.cuda.compiler.CompileException:
                if _own_bf16 is False:  # the header worked for another source: a real error
                    raise
                _own_bf16 = True  # e.g. headers from another CUDA release than this NVRTC
        mod = cupy.RawModule(code=source(name), options=_options(True), backend="nvrtc")
        mod.compile()
        return mod


def kernel(source_name: str, function: str, device: int):
    """The compiled function ``function`` from ``<source_name>.cu`` for ``device`` (compiled once)."""
    key = (source_name, device)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                use_torch_allocator()
                mod = _compile_module(source_name, device)
                _modules[key] = mod
    return mod.get_function(function)


def _stream(device: int):
    import cupy

    ptr = torch.cuda.current_stream(device).cuda_stream
    s = _streams.get((device, ptr))
    if s is None:
        s = cupy.cuda.ExternalStream(ptr, device)
        _streams[(device, ptr)] = s
    return s


def _arg(a: Any) -> Any:
    import numpy as np

    if isinstance(a, torch.Tensor):
        if ARGS_VIA_POINTERS:
            return np.uint64(a.data_ptr())
        import cupy

        t = a.detach()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return cupy.from_dlpack(t)
    if a is None:  # a null pointer
        return np.uint64(0)
    return a


def launch(
    source_name: str,
    function: str,
    device: int,
    grid: int | tuple[int, ...],
    block: int | tuple[int, ...],
    args: Sequence[Any],
    shared_mem: int = 0,
) -> None:
    """Launch on torch's current stream of ``device``. Tensors are passed as device pointers (DLPack);
    scalars must already be numpy scalars of the kernel's parameter types."""
    import cupy

    fn = kernel(source_name, function, device)
    grid = grid if isinstance(grid, tuple) else (int(grid),)
    block = block if isinstance(block, tuple) else (int(block),)
    with cupy.cuda.Device(device), _stream(device):
        if shared_mem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = shared_mem
        fn(grid, block, tuple(_arg(a) for a in args), shared_mem=shared_mem)


def empty(shape: Sequence[int] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (torch's allocator); NaN/-1 filled when DEBUG_FILL_NAN is set."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if DEBUG_FILL_NAN:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def max_shared_mem(device: int) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))
