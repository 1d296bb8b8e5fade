// Rotary position embedding, LLaMA / Hugging Face convention ("rotate half"): element j of a head is paired
// with element j + d/2, i.e. y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1).
// q: [n_tok, hq, d], k: [n_tok, hk, d] contiguous (the [batch, seq, heads, head_dim] layout flattened); both
// are rotated by one launch (hk = 0 and null k pointers for a single tensor).
//
// Work item = (token, group of V pairs j..j+V-1, slice of up to TM_ROPE_HEADS heads counted over q's heads
// then k's). The angle terms of (token, j) are loaded (or computed with sincosf) once per item and reused for
// every head of the slice: per head only x is read and y written, which is the minimum traffic. Items are
// ordered j fastest, so a warp reads whole 16-byte-vector rows of a few heads (coalesced).
#include "common.cuh"

#define TM_ROPE_HEADS 8

// Forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2   (1 = first half, 2 = second half)
// Backward (exact transpose, valid for any tables): dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1
// Angle mode: c1 = c2 = cos(theta), s1 = s2 = sign * sin(theta); sign = -1 is the backward pass (rotation by
// -theta is the transpose of rotation by theta), so there the forward formula is used with negated sines.
template <typename T, int V>
__device__ __forceinline__ void rope_heads(const T *__restrict__ xq, T *__restrict__ yq, const T *__restrict__ xk,
                                           T *__restrict__ yk, long long tok, int hq, int hk, int d, int j,
                                           int h0, const float (&c1)[V], const float (&c2)[V],
                                           const float (&s1)[V], const float (&s2)[V], bool transpose) {
  const int half = d / 2;
  const int h1 = h0 + TM_ROPE_HEADS < hq + hk ? h0 + TM_ROPE_HEADS : hq + hk;
  for (int h = h0; h < h1; ++h) {
    const long long base = h < hq ? (tok * hq + h) * d : (tok * hk + (h - hq)) * d;
    const T *x = h < hq ? xq : xk;
    T *y = h < hq ? yq : yk;
    float a[V], b[V], ya[V], yb[V];
    tm_load<T, V>(x + base + j, a);
    tm_load<T, V>(x + base + j + half, b);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (transpose) {
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

// Index of a work item -> (token, j, first head). 64-bit division once per item, the rest in 32 bits.
struct TmRopeItem {
  long long tok;
  int j, h0;
};

__device__ __forceinline__ TmRopeItem tm_rope_item(long long idx, int groups, int slices, int v) {
  const int per_tok = groups * slices;
  TmRopeItem it;
  it.tok = idx / per_tok;
  const int r = (int)(idx - it.tok * per_tok);
  const int slice = r / groups;
  it.j = (r - slice * groups) * v;
  it.h0 = slice * TM_ROPE_HEADS;
  return it;
}

// Tables: cos/sin [cs_rows, d]; token t reads row t % cs_rows (cs_rows = seq broadcasts over the batch).
template <typename T, int V>
__device__ __forceinline__ void rope_table(const T *__restrict__ xq, T *__restrict__ yq, const T *__restrict__ xk,
                                           T *__restrict__ yk, const T *__restrict__ cos_t,
                                           const T *__restrict__ sin_t, long long n_tok, int hq, int hk, int d,
                                           long long cs_rows, int backward) {
  const int half = d / 2, groups = half / V;
  const int slices = (hq + hk + TM_ROPE_HEADS - 1) / TM_ROPE_HEADS;
  const long long total = n_tok * groups * slices;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const TmRopeItem it = tm_rope_item(idx, groups, slices, V);
    const long long cs = (cs_rows == n_tok ? it.tok : it.tok % cs_rows) * d;
    float c1[V], c2[V], s1[V], s2[V];
    tm_load<T, V>(cos_t + cs + it.j, c1);
    tm_load<T, V>(cos_t + cs + it.j + half, c2);
    tm_load<T, V>(sin_t + cs + it.j, s1);
    tm_load<T, V>(sin_t + cs + it.j + half, s2);
    rope_heads<T, V>(xq, yq, xk, yk, it.tok, hq, hk, d, it.j, it.h0, c1, c2, s1, s2, backward != 0);
  }
}

// Angles from integer positions: theta_j = pos * inv_freq[j] in fp32 (as Hugging Face computes them),
// pos[t % pos_rows]; positions may restart at document boundaries.
template <typename T, int V>
__device__ __forceinline__ void rope_positions(const T *__restrict__ xq, T *__restrict__ yq,
                                               const T *__restrict__ xk, T *__restrict__ yk,
                                               const long long *__restrict__ pos,
                                               const float *__restrict__ inv_freq, long long n_tok, int hq, int hk,
                                               int d, long long pos_rows, float sign) {
  const int half = d / 2, groups = half / V;
  const int slices = (hq + hk + TM_ROPE_HEADS - 1) / TM_ROPE_HEADS;
  const long long total = n_tok * groups * slices;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const TmRopeItem it = tm_rope_item(idx, groups, slices, V);
    const float p = (float)pos[pos_rows == n_tok ? it.tok : it.tok % pos_rows];
    float c[V], s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sincosf(p * inv_freq[it.j + i], &s[i], &c[i]);
      s[i] *= sign;
    }
    rope_heads<T, V>(xq, yq, xk, yk, it.tok, hq, hk, d, it.j, it.h0, c, c, s, s, false);
  }
}

#define TM_ROPE(T, NAME, V)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256)                                                          \
      rope_table_##NAME##_v##V(const T *xq, T *yq, const T *xk, T *yk, const T *cos_t, const T *sin_t,        \
                               long long n_tok, int hq, int hk, int d, long long cs_rows, int backward) {     \
    rope_table<T, V>(xq, yq, xk, yk, cos_t, sin_t, n_tok, hq, hk, d, cs_rows, backward);                      \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                                          \
      rope_positions_##NAME##_v##V(const T *xq, T *yq, const T *xk, T *yk, const long long *pos,              \
                                   const float *inv_freq, long long n_tok, int hq, int hk, int d,             \
                                   long long pos_rows, float sign) {                                         \
    rope_positions<T, V>(xq, yq, xk, yk, pos, inv_freq, n_tok, hq, hk, d, pos_rows, sign);                    \
  }

TM_ROPE(bf16, bf16, 8)
TM_ROPE(bf16, bf16, 1)
TM_ROPE(float, f32, 4)
TM_ROPE(float, f32, 1)
