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

// Multi-tensor step: one launch updates every tensor of a list (same dtype and hyper-parameters). Tensor t's
// quantisation blocks are numbered qb_start[t] .. qb_start[t + 1] - 1 in one global range (qb_start has
// n_tensors + 1 entries); table[6t .. 6t + 5] holds its device pointers p, g, q1, q2, absmax1, absmax2 and
// sizes[t] its element count. Each element is read once (p, g, two uint8 codes) and written once (p, codes);
// absmax once per 256 elements.
// Thread k of a quantisation block handles elements k, k + 64, k + 128, k + 192: coalesced, no alignment needs.
template <typename T>
__device__ __forceinline__ void adamw8bit_multi(const unsigned long long *__restrict__ table,
                                                const long long *__restrict__ sizes,
                                                const long long *__restrict__ qb_start, int n_tensors,
                                                const float *__restrict__ code1, const float *__restrict__ code2,
                                                float beta1, float beta2, float eps, float step_size,
                                                float bc2_sqrt, float decay) {
  __shared__ float c1[256], c2[256];
  __shared__ float red1[2 * TM_GROUPS], red2[2 * TM_GROUPS];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    c1[i] = code1[i];
    c2[i] = code2[i];
  }
  __syncthreads();
  const int group = threadIdx.x >> 6, k = threadIdx.x & 63, warp = threadIdx.x >> 5;
  const long long n_qb = qb_start[n_tensors];
  // Every thread runs the same number of iterations (the loop bound is block-uniform) for __syncthreads.
  for (long long first = (long long)blockIdx.x * TM_GROUPS; first < n_qb;
       first += (long long)gridDim.x * TM_GROUPS) {
    const long long gqb = first + group;
    const bool active = gqb < n_qb;
    T *p = nullptr;
    const T *g = nullptr;
    unsigned char *q1 = nullptr, *q2 = nullptr;
    float *absmax1 = nullptr, *absmax2 = nullptr;
    long long n = 0, qb = 0;
    if (active) {
      int lo = 0, hi = n_tensors - 1;  // the last tensor whose range starts at or before gqb
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (qb_start[mid] <= gqb) lo = mid;
        else hi = mid - 1;
      }
      const unsigned long long *e = table + 6 * (long long)lo;
      p = reinterpret_cast<T *>(e[0]);
      g = reinterpret_cast<const T *>(e[1]);
      q1 = reinterpret_cast<unsigned char *>(e[2]);
      q2 = reinterpret_cast<unsigned char *>(e[3]);
      absmax1 = reinterpret_cast<float *>(e[4]);
      absmax2 = reinterpret_cast<float *>(e[5]);
      n = sizes[lo];
      qb = gqb - qb_start[lo];
    }
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
    // a quantisation block is two whole warps of one group, so the group's absmax needs no other tensor
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
  extern "C" __global__ void __launch_bounds__(256)                                                          \
      adamw8bit_##NAME(const unsigned long long *table, const long long *sizes, const long long *qb_start,    \
                       int n_tensors, const float *code1, const float *code2, float beta1, float beta2,       \
                       float eps, float step_size, float bc2_sqrt, float decay) {                            \
    adamw8bit_multi<T>(table, sizes, qb_start, n_tensors, code1, code2, beta1, beta2, eps, step_size,         \
                       bc2_sqrt, decay);                                                                     \
  }

TM_ADAMW8(bf16, bf16)
TM_ADAMW8(float, f32)
