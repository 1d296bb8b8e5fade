// AdamW with 8-bit block-wise quantised moments (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization"). Each block of 256 elements stores its moments as uint8 indices into a sorted 256-entry
// dynamic code (signed for m, unsigned for v) times the block's fp32 absmax: 2 bytes + 8/256 per parameter.
// One update: dequantise, Adam moment update in fp32, decoupled weight decay, parameter step, new absmax,
// requantise to the nearest code.
#include "common.cuh"

#define TM_QBLOCK 256
#define TM_GROUPS 4  // quantisation blocks per CUDA block (256 threads, 64 per quantisation block)

// Index of the code nearest to x (ties go to the lower code). code is sorted ascending.
__device__ __forceinline__ unsigned char tm_quantize(const float *code, float x) {
  int lo = 0, hi = 255;  // largest lo with code[lo] <= x (0 when x < code[0])
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (code[mid] <= x) lo = mid;
    else hi = mid - 1;
  }
  if (lo < 255 && code[lo + 1] - x < x - code[lo]) ++lo;
  return (unsigned char)lo;
}

// Thread k of a quantisation block handles elements k, k + 64, k + 128, k + 192: coalesced, no alignment needs.
template <typename T>
__device__ __forceinline__ void adamw8bit_step(T *__restrict__ p, const T *__restrict__ g,
                                               unsigned char *__restrict__ q1, unsigned char *__restrict__ q2,
                                               float *__restrict__ absmax1, float *__restrict__ absmax2,
                                               const float *__restrict__ code1, const float *__restrict__ code2,
                                               long long n, float beta1, float beta2, float eps, float step_size,
                                               float bc2_sqrt, float decay) {
  __shared__ float c1[256], c2[256];
  __shared__ float red1[2 * TM_GROUPS], red2[2 * TM_GROUPS];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    c1[i] = code1[i];
    c2[i] = code2[i];
  }
  __syncthreads();
  const int group = threadIdx.x >> 6, k = threadIdx.x & 63, warp = threadIdx.x >> 5;
  const long long n_qb = (n + TM_QBLOCK - 1) / TM_QBLOCK;
  // Every thread runs the same number of iterations (the loop bound is block-uniform) for __syncthreads.
  for (long long first = (long long)blockIdx.x * TM_GROUPS; first < n_qb;
       first += (long long)gridDim.x * TM_GROUPS) {
    const long long qb = first + group;
    const bool active = qb < n_qb;
    const float a1 = active ? absmax1[qb] : 0.f, a2 = active ? absmax2[qb] : 0.f;
    float m[4], v[4], max1 = 0.f, max2 = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long long i = qb * TM_QBLOCK + k + 64 * e;
      m[e] = 0.f;
      v[e] = 0.f;
      if (active && i < n) {
        const float gi = tm_to_float(g[i]);
        float pi = tm_to_float(p[i]);
        m[e] = beta1 * (c1[q1[i]] * a1) + (1.f - beta1) * gi;
        v[e] = beta2 * (c2[q2[i]] * a2) + (1.f - beta2) * gi * gi;
        pi = pi * decay - step_size * m[e] / (sqrtf(v[e]) / bc2_sqrt + eps);
        tm_from_float(pi, p[i]);
        max1 = fmaxf(max1, fabsf(m[e]));
        max2 = fmaxf(max2, v[e]);
      }
    }
    max1 = tm_warp_max(max1);
    max2 = tm_warp_max(max2);
    if ((threadIdx.x & 31) == 0) {
      red1[warp] = max1;
      red2[warp] = max2;
    }
    __syncthreads();
    max1 = fmaxf(red1[2 * group], red1[2 * group + 1]);
    max2 = fmaxf(red2[2 * group], red2[2 * group + 1]);
    __syncthreads();  // red1/red2 are rewritten in the next iteration
    if (!active) continue;
    if (k == 0) {
      absmax1[qb] = max1;
      absmax2[qb] = max2;
    }
    const float inv1 = max1 > 0.f ? 1.f / max1 : 0.f, inv2 = max2 > 0.f ? 1.f / max2 : 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long long i = qb * TM_QBLOCK + k + 64 * e;
      if (i < n) {
        q1[i] = tm_quantize(c1, m[e] * inv1);
        q2[i] = tm_quantize(c2, v[e] * inv2);
      }
    }
  }
}

#define TM_ADAMW8(T, NAME)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) adamw8bit_##NAME(T *p, const T *g, unsigned char *q1, unsigned char *q2,        \
                                              float *absmax1, float *absmax2, const float *code1,           \
                                              const float *code2, long long n, float beta1, float beta2,    \
                                              float eps, float step_size, float bc2_sqrt, float decay) {    \
    adamw8bit_step<T>(p, g, q1, q2, absmax1, absmax2, code1, code2, n, beta1, beta2, eps, step_size,        \
                      bc2_sqrt, decay);                                                                     \
  }

TM_ADAMW8(bf16, bf16)
TM_ADAMW8(float, f32)
