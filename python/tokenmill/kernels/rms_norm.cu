// RMSNorm (LLaMA): y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32 per row.
// x, y: [n_rows, d] contiguous; w: [d]; rstd: [n_rows] fp32 saved for the backward pass.
#include "common.cuh"

// One block per row (grid-stride over rows); V elements per access.
template <typename T, int V>
__device__ __forceinline__ void rms_norm_fwd(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y,
                                             float *__restrict__ rstd, long long n_rows, int d, float eps) {
  __shared__ float scratch[32];
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T *xr = x + row * d;
    T *yr = y + row * d;
    float ss = 0.f;
    for (int c = threadIdx.x * V; c < d; c += blockDim.x * V) {
      float xv[V];
      tm_load<T, V>(xr + c, xv);
#pragma unroll
      for (int i = 0; i < V; ++i) ss += xv[i] * xv[i];
    }
    ss = tm_block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int c = threadIdx.x * V; c < d; c += blockDim.x * V) {  // second read hits L1/L2
      float xv[V], wv[V], yv[V];
      tm_load<T, V>(xr + c, xv);
      tm_load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) yv[i] = xv[i] * r * wv[i];
      tm_store<T, V>(yr + c, yv);
    }
  }
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd.
// dw = sum over rows of dy * xhat: each block (a fixed, fully resident grid looping over rows) accumulates
// its rows in shared memory, then writes one partial row to dw_partial[blockIdx.x, :]; rms_norm_dw_reduce sums
// the partials in a fixed order, so the weight gradient is deterministic and needs no atomics.
// Shared layout: thread t's element i of its vector at column c = it*B*V + t*V + i lives at it*B*V + i*B + t
// (B = blockDim.x), so a warp's accumulations hit 32 consecutive words (no bank conflicts; the plain
// layout c would be an 8-way conflict for bf16 vectors). dw_acc holds round_up(d, B*V) floats.
template <typename T, int V>
__device__ __forceinline__ void rms_norm_bwd(const T *__restrict__ dy, const T *__restrict__ x,
                                             const T *__restrict__ w, const float *__restrict__ rstd,
                                             T *__restrict__ dx, float *__restrict__ dw_partial, long long n_rows,
                                             int d) {
  extern __shared__ float dw_acc[];
  __shared__ float scratch[32];
  const int B = blockDim.x, span = B * V;
  const int n_acc = (d + span - 1) / span * span;
  for (int s = threadIdx.x; s < n_acc; s += B) dw_acc[s] = 0.f;
  __syncthreads();
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T *xr = x + row * d;
    const T *dyr = dy + row * d;
    T *dxr = dx + row * d;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x * V; c < d; c += span) {
      float xv[V], gv[V], wv[V];
      tm_load<T, V>(xr + c, xv);
      tm_load<T, V>(dyr + c, gv);
      tm_load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += gv[i] * wv[i] * xv[i];
    }
    const float mean_gx = tm_block_sum(dot, scratch) * r / (float)d;
    for (int c = threadIdx.x * V, base = 0; c < d; c += span, base += span) {  // second read hits L1/L2
      float xv[V], gv[V], wv[V], out[V];
      tm_load<T, V>(xr + c, xv);
      tm_load<T, V>(dyr + c, gv);
      tm_load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = xv[i] * r;
        out[i] = r * (gv[i] * wv[i] - xhat * mean_gx);
        dw_acc[base + i * B + threadIdx.x] += gv[i] * xhat;  // only this thread touches these words
      }
      tm_store<T, V>(dxr + c, out);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += B) {
    const int it = c / span, rem = c - it * span, t = rem / V, i = rem - t * V;
    dw_partial[(long long)blockIdx.x * d + c] = dw_acc[it * span + i * B + t];
  }
}

// dw[c] = sum of dw_partial[p, c] over p. One block of 256 threads (8 warps) per 32 columns: lane = column
// (coalesced 128-byte reads), warp w sums parts w, w + 8, ...; warp 0 adds the 8 warp sums in order.
template <typename T>
__device__ __forceinline__ void rms_norm_dw_reduce(const float *__restrict__ partial, int n_parts, int d,
                                                   T *__restrict__ dw) {
  __shared__ float sums[32][33];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int c = blockIdx.x * 32 + lane;
  float acc = 0.f;
  if (c < d) {
#pragma unroll 4
    for (int p = warp; p < n_parts; p += n_warps) acc += partial[(long long)p * d + c];
  }
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < d) {
    float total = 0.f;
    for (int k = 0; k < n_warps; ++k) total += sums[k][lane];
    tm_from_float(total, dw[c]);
  }
}

#define TM_RMS_NORM(T, NAME, V)                                                                              \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_fwd_##NAME##_v##V(const T *x, const T *w, T *y, float *rstd,         \
                                                        long long n_rows, int d, float eps) {              \
    rms_norm_fwd<T, V>(x, w, y, rstd, n_rows, d, eps);                                                     \
  }                                                                                                        \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_bwd_##NAME##_v##V(const T *dy, const T *x, const T *w,               \
                                                        const float *rstd, T *dx, float *dw_partial,       \
                                                        long long n_rows, int d) {                         \
    rms_norm_bwd<T, V>(dy, x, w, rstd, dx, dw_partial, n_rows, d);                                         \
  }

TM_RMS_NORM(bf16, bf16, 8)
TM_RMS_NORM(bf16, bf16, 1)
TM_RMS_NORM(float, f32, 4)
TM_RMS_NORM(float, f32, 1)

extern "C" __global__ void __launch_bounds__(256) rms_norm_dw_reduce_bf16(const float *partial, int n_parts, int d, bf16 *dw) {
  rms_norm_dw_reduce<bf16>(partial, n_parts, d, dw);
}
extern "C" __global__ void __launch_bounds__(256) rms_norm_dw_reduce_f32(const float *partial, int n_parts, int d, float *dw) {
  rms_norm_dw_reduce<float>(partial, n_parts, d, dw);
}
