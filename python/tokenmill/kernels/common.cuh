// Shared device helpers for tokenmill kernels: bf16 <-> fp32 conversion, vector loads, block reductions.
// Every kernel computes in fp32 and rounds once on store (round-to-nearest-even for bf16).
#pragma once

#ifndef TM_OWN_BF16
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
__device__ __forceinline__ float tm_to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void tm_from_float(float f, bf16 &out) { out = __float2bfloat16_rn(f); }
#else
// Fallback when cuda_bf16.h cannot be found or compiled by the NVRTC at hand: same bit layout and rounding.
struct __align__(2) bf16 { unsigned short x; };
__device__ __forceinline__ float tm_to_float(bf16 v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ void tm_from_float(float f, bf16 &out) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    out.x = (unsigned short)((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out.x = (unsigned short)(u >> 16);
}
#endif

__device__ __forceinline__ float tm_to_float(float v) { return v; }
__device__ __forceinline__ void tm_from_float(float f, float &out) { out = f; }

#define TM_NEG_INF __int_as_float(0xff800000)

// N contiguous elements loaded/stored as one aligned access (16 bytes for the vectorised variants).
template <typename T, int N>
struct alignas(sizeof(T) * N) TmVec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void tm_load(const T *p, float (&out)[N]) {
  TmVec<T, N> tmp = *reinterpret_cast<const TmVec<T, N> *>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = tm_to_float(tmp.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void tm_store(T *p, const float (&in)[N]) {
  TmVec<T, N> tmp;
#pragma unroll
  for (int i = 0; i < N; ++i) tm_from_float(in[i], tmp.v[i]);
  *reinterpret_cast<TmVec<T, N> *>(p) = tmp;
}

__device__ __forceinline__ float tm_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float tm_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32; scratch holds 32 floats.
__device__ __forceinline__ float tm_block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = tm_warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return tm_warp_sum(v);
}
