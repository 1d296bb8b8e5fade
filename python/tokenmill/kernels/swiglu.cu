// SwiGLU: y = silu(gate) * up. The backward recomputes sigmoid(gate) from the saved inputs instead of
// keeping silu(gate) alive: dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s, s = sigmoid(gate).
#include "common.cuh"

__device__ __forceinline__ float tm_sigmoid(float g) { return 1.f / (1.f + expf(-g)); }  // exp overflow -> 0

template <typename T, int V>
__device__ __forceinline__ void swiglu_fwd(const T *__restrict__ gate, const T *__restrict__ up,
                                           T *__restrict__ y, long long n) {
  const long long nv = n / V;  // the host picks V so that V divides n
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < nv;
       k += (long long)gridDim.x * blockDim.x) {
    float g[V], u[V], out[V];
    tm_load<T, V>(gate + k * V, g);
    tm_load<T, V>(up + k * V, u);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = g[i] * tm_sigmoid(g[i]) * u[i];
    tm_store<T, V>(y + k * V, out);
  }
}

template <typename T, int V>
__device__ __forceinline__ void swiglu_bwd(const T *__restrict__ dy, const T *__restrict__ gate,
                                           const T *__restrict__ up, T *__restrict__ dgate, T *__restrict__ dup,
                                           long long n) {
  const long long nv = n / V;
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < nv;
       k += (long long)gridDim.x * blockDim.x) {
    float d[V], g[V], u[V], dg[V], du[V];
    tm_load<T, V>(dy + k * V, d);
    tm_load<T, V>(gate + k * V, g);
    tm_load<T, V>(up + k * V, u);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float s = tm_sigmoid(g[i]);
      du[i] = d[i] * g[i] * s;
      dg[i] = d[i] * u[i] * s * (1.f + g[i] * (1.f - s));
    }
    tm_store<T, V>(dgate + k * V, dg);
    tm_store<T, V>(dup + k * V, du);
  }
}

#define TM_SWIGLU(T, NAME, V)                                                                                \
  extern "C" __global__ void __launch_bounds__(256) swiglu_fwd_##NAME##_v##V(const T *gate, const T *up, T *y, long long n) {      \
    swiglu_fwd<T, V>(gate, up, y, n);                                                                       \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(256) swiglu_bwd_##NAME##_v##V(const T *dy, const T *gate, const T *up, T *dgate,    \
                                                      T *dup, long long n) {                                \
    swiglu_bwd<T, V>(dy, gate, up, dgate, dup, n);                                                          \
  }

TM_SWIGLU(bf16, bf16, 8)
TM_SWIGLU(bf16, bf16, 1)
TM_SWIGLU(float, f32, 4)
TM_SWIGLU(float, f32, 1)
