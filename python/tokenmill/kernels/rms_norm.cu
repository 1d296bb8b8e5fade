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
// dw = sum over rows of dy * xhat: each block accumulates its rows in shared memory (d floats, dynamic),
// then writes one partial row to dw_partial[blockIdx.x, :]; rms_norm_dw_reduce sums the partials in a fixed
// order, so the weight gradient is deterministic and needs no atomics.
template <typename T, int V>
__device__ __forceinline__ void rms_norm_bwd(const T *__restrict__ dy, const T *__restrict__ x,
                                             const T *__restrict__ w, const float *__restrict__ rstd,
                                             T *__restrict__ dx, float *__restrict__ dw_partial, long long n_rows,
                                             int d) {
  extern __shared__ float dw_acc[];
  __shared__ float scratch[32];
  for (int c = threadIdx.x; c < d; c += blockDim.x) dw_acc[c] = 0.f;
  __syncthreads();
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T *xr = x + row * d;
    const T *dyr = dy + row * d;
    T *dxr = dx + row * d;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x * V; c < d; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V];
      tm_load<T, V>(xr + c, xv);
      tm_load<T, V>(dyr + c, gv);
      tm_load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) dot += gv[i] * wv[i] * xv[i];
    }
    const float mean_gx = tm_block_sum(dot, scratch) * r / (float)d;
    for (int c = threadIdx.x * V; c < d; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V], out[V];
      tm_load<T, V>(xr + c, xv);
      tm_load<T, V>(dyr + c, gv);
      tm_load<T, V>(w + c, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = xv[i] * r;
        out[i] = r * (gv[i] * wv[i] - xhat * mean_gx);
        dw_acc[c + i] += gv[i] * xhat;  // column c + i always belongs to this thread
      }
      tm_store<T, V>(dxr + c, out);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) dw_partial[(long long)blockIdx.x * d + c] = dw_acc[c];
}

template <typename T>
__device__ __forceinline__ void rms_norm_dw_reduce(const float *__restrict__ partial, int n_parts, int d,
                                                   T *__restrict__ dw) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float acc = 0.f;
  for (int p = 0; p < n_parts; ++p) acc += partial[(long long)p * d + c];
  tm_from_float(acc, dw[c]);
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

extern "C" __global__ void rms_norm_dw_reduce_bf16(const float *partial, int n_parts, int d, bf16 *dw) {
  rms_norm_dw_reduce<bf16>(partial, n_parts, d, dw);
}
extern "C" __global__ void rms_norm_dw_reduce_f32(const float *partial, int n_parts, int d, float *dw) {
  rms_norm_dw_reduce<float>(partial, n_parts, d, dw);
}
