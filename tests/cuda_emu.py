"""A CPU emulator for the CUDA sources, used to test the kernels' index math and the host launch code
without a GPU.

Each ``.cu`` file is compiled as C++20 with g++ against a small shim: every CUDA thread of a block is an OS
thread, ``__syncthreads`` a block-wide ``std::barrier``, ``__shfl_xor_sync`` an exchange through a per-warp
buffer between two warp barriers, ``__shared__`` a static (blocks run one after another), dynamic shared
memory a buffer of the launch's size. bf16 uses the source's own (TM_OWN_BF16) conversion. ``install``
replaces ``launch.launch`` so that ops.py's CUDA host code drives the emulated kernels on CPU tensors, and
checks every argument's size and kind against the kernel's C++ signature (as CuPy would need them).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHIM = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <math.h>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static std::barrier<> *tm_block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> tm_warp_barriers;
static float tm_warp_buf[32][32];
static unsigned char *tm_dyn_smem;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

static inline void __syncthreads() { tm_block_barrier->arrive_and_wait(); }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  tm_warp_buf[warp][lane] = v;
  tm_warp_barriers[warp]->arrive_and_wait();
  const float r = tm_warp_buf[warp][lane ^ o];
  tm_warp_barriers[warp]->arrive_and_wait();
  return r;
}
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// correctly rounded fp32 operations (compiled with -ffp-contract=off: never fused, as on the GPU)
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
"""

RUNNER = r"""
template <typename... A, size_t... I>
static void tm_call(void (*k)(A...), void **args, std::index_sequence<I...>) { k(*static_cast<A *>(args[I])...); }

template <typename A> static char tm_kind() {
  return std::is_pointer<A>::value ? 'p' : std::is_floating_point<A>::value ? 'f' : 'i';
}

struct TmEntry { std::function<void(void **)> call; std::string sig; };

template <typename... A> static TmEntry tm_wrap(void (*k)(A...)) {
  std::string sig;
  ((sig += tm_kind<A>(), sig += std::to_string(sizeof(A))), ...);
  return {[k](void **a) { tm_call(k, a, std::index_sequence_for<A...>{}); }, sig};
}

static std::map<std::string, TmEntry> &tm_registry();

extern "C" int tm_signature(const char *name, char *out, int cap) {
  auto it = tm_registry().find(name);
  if (it == tm_registry().end()) return -1;
  std::strncpy(out, it->second.sig.c_str(), cap);
  return (int)it->second.sig.size();
}

extern "C" int tm_launch(const char *name, unsigned grid, unsigned block, unsigned long smem, void **args) {
  auto it = tm_registry().find(name);
  if (it == tm_registry().end() || block % 32 || block > 1024 || grid == 0) return 1;
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  std::vector<unsigned char> dyn(smem + 16, 0xff);  // garbage-filled, like real shared memory
  tm_dyn_smem = dyn.data();
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    tm_block_barrier = &bar;
    tm_warp_barriers.clear();
    for (unsigned w = 0; w < block / 32; ++w) tm_warp_barriers.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&, t, b] {
        threadIdx = {t, 1, 1};
        blockIdx = {b, 1, 1};
        it->second.call(args);
      });
    for (auto &th : threads) th.join();
  }
  return 0;
}
"""


def available() -> bool:
    return shutil.which("g++") is not None


def _translate(source: str) -> str:
    # dynamic shared memory: `extern __shared__ float name[];` -> a pointer into the launch's buffer
    return re.sub(
        r"extern __shared__ (\w+) (\w+)\[\];", r"\1 *\2 = reinterpret_cast<\1 *>(tm_dyn_smem);", source
    )


def _kernel_names(lib_source: str) -> list[str]:
    """extern "C" kernel names after expanding the TM_* instantiation macros (done by the compiler: we ask
    g++ for the preprocessed text)."""
    return sorted(set(re.findall(r'extern "C" +void +(\w+)\(', lib_source)))


def build(build_dir: Path) -> dict[str, ctypes.CDLL]:
    from tokenmill.kernels import launch

    libs = {}
    build_dir.mkdir(parents=True, exist_ok=True)
    for name in launch.SOURCES:
        body = SHIM + "#define TM_OWN_BF16 1\n" + _translate(launch.source(name)) + RUNNER
        # Preprocess once to learn the instantiated kernel names, then add the registry.
        pre = subprocess.run(
            ["g++", "-std=c++20", "-E", "-P", "-x", "c++", "-"],
            input=body,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = _kernel_names(pre)
        reg = "static std::map<std::string, TmEntry> &tm_registry() {\n  static std::map<std::string, TmEntry> r = {\n"
        reg += "".join(f'    {{"{n}", tm_wrap(&{n})}},\n' for n in names)
        reg += "  };\n  return r;\n}\n"
        full = body + reg
        digest = hashlib.sha256(full.encode()).hexdigest()[:16]
        so = build_dir / f"{name}-{digest}.so"
        if not so.exists():
            src = build_dir / f"{name}-{digest}.cc"
            src.write_text(full)
            cmd = [
                "g++",
                "-std=c++20",
                "-O1",
                "-shared",
                "-fPIC",
                "-pthread",
                "-fno-strict-aliasing",
                "-ffp-contract=off",
                "-w",
                "-o",
                str(so),
                str(src),
            ]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(so))
        lib.tm_launch.restype = ctypes.c_int
        lib.tm_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.tm_signature.restype = ctypes.c_int
        lib.tm_signature.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        libs[name] = lib
    return libs


def _ctype(a: Any) -> tuple[Any, str]:
    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr()), "p8"
    if a is None:
        return ctypes.c_void_p(0), "p8"
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a)), "i8"
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a)), "i4"
    if isinstance(a, np.uint64):
        return ctypes.c_uint64(int(a)), "p8"  # a raw pointer
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a)), "f4"
    raise TypeError(f"kernel argument of type {type(a).__name__} would not reach CUDA with a fixed size")


class Emulator:
    def __init__(self, libs: dict[str, ctypes.CDLL]) -> None:
        self.libs = libs
        self.launches: list[tuple[str, str, int, int]] = []

    def launch(self, source_name, function, device, grid, block, args, shared_mem=0) -> None:
        lib = self.libs[source_name]
        buf = ctypes.create_string_buffer(256)
        n = lib.tm_signature(function.encode(), buf, 256)
        if n < 0:
            raise AssertionError(f"{source_name}.cu has no kernel {function}")
        grid = grid[0] if isinstance(grid, tuple) else int(grid)
        block = block[0] if isinstance(block, tuple) else int(block)
        vals, kinds = zip(*(_ctype(a) for a in args)) if args else ((), ())
        got = "".join(kinds)
        want = buf.value.decode()
        assert got == want, f"{function}: arguments {got} do not match the kernel's parameters {want}"
        assert 1 <= grid < 2**31 and 32 <= block <= 1024, (function, grid, block)
        arr = (ctypes.c_void_p * max(1, len(vals)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals]
        )
        rc = lib.tm_launch(function.encode(), grid, block, shared_mem, arr)
        assert rc == 0, f"emulated launch of {function} failed ({rc})"
        self.launches.append((source_name, function, grid, block))
