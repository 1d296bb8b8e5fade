// The softmax part of the fused linear cross-entropy. The host computes one chunk of logits [rows, vocab]
// with cuBLAS; this kernel turns it, row by row, into the per-token loss and (in place) the gradient of the
// loss with respect to the logits, so a chunk is the only logits buffer that ever exists.
#include "common.cuh"

// Online log-sum-exp state: running max m and sum s of exp(x - m). Empty state: m = -inf, s = 0.
__device__ __forceinline__ void ce_combine(float &m, float &s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == TM_NEG_INF) return;  // both empty (or all -inf): nothing to add
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

// One block per row, grid-stride over rows. The host launches about one 1024-thread block per SM, so the
// rows in flight (132 x 256 KB at V = 128256 in bf16) fit in L2 and the second pass over a row reads L2,
// not DRAM. loss[row] = lse - logits[row, target] in fp32 (0 for ignored rows).
// With with_grad != 0 the row is overwritten by (softmax - onehot(target)) * (*grad_scale), or zeros for an
// ignored row; grad_scale points at a device scalar (1 / number of counted tokens for "mean", 1 for "sum").
template <typename T, int V>
__device__ __forceinline__ void ce_rows(T *__restrict__ logits, const long long *__restrict__ targets,
                                        float *__restrict__ loss, const float *__restrict__ grad_scale,
                                        long long n_rows, long long vocab, long long ignore_index, int with_grad) {
  __shared__ float sm[32], ss[32];
  __shared__ float target_logit;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
    T *xr = logits + row * vocab;
    const long long t = targets[row];
    const bool ignored = (t == ignore_index);
    // Read the target's logit before any thread overwrites the row (the reduction below synchronises).
    if (threadIdx.x == 0) target_logit = ignored ? 0.f : tm_to_float(xr[t]);
    float m = TM_NEG_INF, s = 0.f;
#pragma unroll 4
    for (long long c = (long long)threadIdx.x * V; c < vocab; c += (long long)blockDim.x * V) {
      float xv[V];
      tm_load<T, V>(xr + c, xv);
      float lm = xv[0];
#pragma unroll
      for (int i = 1; i < V; ++i) lm = fmaxf(lm, xv[i]);
      const float mn = fmaxf(m, lm);
      if (mn == TM_NEG_INF) continue;
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < V; ++i) acc += expf(xv[i] - mn);  // NaN logits propagate into the sum
      s = s * expf(m - mn) + acc;
      m = mn;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      ce_combine(m, s, m2, s2);
    }
    __syncthreads();  // sm/ss and target_logit of the previous row are no longer read
    if (lane == 0) {
      sm[warp] = m;
      ss[warp] = s;
    }
    __syncthreads();
    m = lane < n_warps ? sm[lane] : TM_NEG_INF;
    s = lane < n_warps ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      ce_combine(m, s, m2, s2);
    }
    const float lse = m + logf(s);
    if (threadIdx.x == 0) loss[row] = ignored ? 0.f : lse - target_logit;
    if (!with_grad) continue;
    const float scale = ignored ? 0.f : *grad_scale;
#pragma unroll 4
    for (long long c = (long long)threadIdx.x * V; c < vocab; c += (long long)blockDim.x * V) {
      float xv[V];
      if (ignored) {
#pragma unroll
        for (int i = 0; i < V; ++i) xv[i] = 0.f;
      } else {
        tm_load<T, V>(xr + c, xv);
#pragma unroll
        for (int i = 0; i < V; ++i) xv[i] = (expf(xv[i] - lse) - (c + i == t ? 1.f : 0.f)) * scale;
      }
      tm_store<T, V>(xr + c, xv);
    }
  }
}

#define TM_CE(T, NAME, V)                                                                                    \
  extern "C" __global__ void __launch_bounds__(1024) ce_rows_##NAME##_v##V(T *logits, const long long *targets, float *loss,        \
                                                   const float *grad_scale, long long n_rows, long long vocab, \
                                                   long long ignore_index, int with_grad) {                \
    ce_rows<T, V>(logits, targets, loss, grad_scale, n_rows, vocab, ignore_index, with_grad);              \
  }

TM_CE(bf16, bf16, 8)
TM_CE(bf16, bf16, 1)
TM_CE(float, f32, 4)
TM_CE(float, f32, 1)
