// Rotary position embedding, LLaMA / Hugging Face convention ("rotate half"): element j of a head is paired
// with element j + d/2, i.e. y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1).
// x, y: [n_tok, n_heads, d] contiguous (the [batch, seq, heads, head_dim] layout flattened).
#include "common.cuh"

// Tables: cos/sin [cs_rows, d]; token t reads row t % cs_rows (cs_rows = seq broadcasts over the batch).
// Forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2   (1 = first half, 2 = second half)
// Backward (exact transpose, valid for any tables): dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1
template <typename T, int V>
__device__ __forceinline__ void rope_table(const T *__restrict__ x, T *__restrict__ y, const T *__restrict__ cos_t,
                                           const T *__restrict__ sin_t, long long n_tok, int n_heads, int d,
                                           long long cs_rows, int backward) {
  const int half = d / 2, groups = half / V;
  const long long total = n_tok * n_heads * groups;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int j = (int)(idx % groups) * V;
    const long long th = idx / groups;  // token * n_heads + head
    const long long tok = th / n_heads;
    const long long base = th * d;
    const long long cs = (tok % cs_rows) * d;
    float a[V], b[V], c1[V], c2[V], s1[V], s2[V], ya[V], yb[V];
    tm_load<T, V>(x + base + j, a);
    tm_load<T, V>(x + base + j + half, b);
    tm_load<T, V>(cos_t + cs + j, c1);
    tm_load<T, V>(cos_t + cs + j + half, c2);
    tm_load<T, V>(sin_t + cs + j, s1);
    tm_load<T, V>(sin_t + cs + j + half, s2);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (backward) {
        ya[i] = a[i] * c1[i] + b[i] * s2[i];
        yb[i] = b[i] * c2[i] - a[i] * s1[i];
      } else {
        ya[i] = a[i] * c1[i] - b[i] * s1[i];
        yb[i] = b[i] * c2[i] + a[i] * s2[i];
      }
    }
    tm_store<T, V>(y + base + j, ya);
    tm_store<T, V>(y + base + j + half, yb);
  }
}

// Angles from integer positions: theta_j = pos * inv_freq[j] in fp32 (as Hugging Face computes them),
// pos[t % pos_rows]; positions may restart at document boundaries. sign = -1 gives the backward pass
// (rotation by -theta is the transpose of rotation by theta).
template <typename T, int V>
__device__ __forceinline__ void rope_positions(const T *__restrict__ x, T *__restrict__ y,
                                               const long long *__restrict__ pos,
                                               const float *__restrict__ inv_freq, long long n_tok, int n_heads,
                                               int d, long long pos_rows, float sign) {
  const int half = d / 2, groups = half / V;
  const long long total = n_tok * n_heads * groups;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int j = (int)(idx % groups) * V;
    const long long th = idx / groups;
    const long long tok = th / n_heads;
    const long long base = th * d;
    const float p = (float)pos[tok % pos_rows];
    float a[V], b[V], ya[V], yb[V];
    tm_load<T, V>(x + base + j, a);
    tm_load<T, V>(x + base + j + half, b);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float s, c;
      sincosf(p * inv_freq[j + i], &s, &c);
      s *= sign;
      ya[i] = a[i] * c - b[i] * s;
      yb[i] = b[i] * c + a[i] * s;
    }
    tm_store<T, V>(y + base + j, ya);
    tm_store<T, V>(y + base + j + half, yb);
  }
}

#define TM_ROPE(T, NAME, V)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) rope_table_##NAME##_v##V(const T *x, T *y, const T *cos_t, const T *sin_t,     \
                                                      long long n_tok, int n_heads, int d, long long cs_rows, \
                                                      int backward) {                                        \
    rope_table<T, V>(x, y, cos_t, sin_t, n_tok, n_heads, d, cs_rows, backward);                              \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256) rope_positions_##NAME##_v##V(const T *x, T *y, const long long *pos,           \
                                                          const float *inv_freq, long long n_tok,           \
                                                          int n_heads, int d, long long pos_rows,           \
                                                          float sign) {                                      \
    rope_positions<T, V>(x, y, pos, inv_freq, n_tok, n_heads, d, pos_rows, sign);                            \
  }

TM_ROPE(bf16, bf16, 8)
TM_ROPE(bf16, bf16, 1)
TM_ROPE(float, f32, 4)
TM_ROPE(float, f32, 1)
