// NF4 dequantisation (tokenmill.quant's layout = bitsandbytes'): two 4-bit level indices per byte, element
// 2i in the high nibble; per block of `block_size` values an 8-bit code of its absmax in the signed dynamic
// map, with one fp32 scale per 256 blocks and one fp32 offset (double quantisation). In fp32, in the
// reference's order (kernels/reference.py: nf4_dequantize), rounded once: bit-identical to it.
//   absmax = code[absmax_q[b]] * scale[b / 256] + offset;  value = levels[index] * absmax
// A fused dequant+matmul is not here: at training batch sizes the matmul is compute-bound and this pass
// adds ~2.5 bytes of traffic per weight (0.5 read, 2 written in bf16), a few % of the GEMM's time.
#include "common.cuh"

__device__ __forceinline__ float tm_nf4_absmax(const unsigned char *absmax_q, const float *code,
                                               const float *scale, float offset, long long b) {
  return __fadd_rn(__fmul_rn(code[absmax_q[b]], scale[b >> 8]), offset);
}

template <typename T, int V>
__device__ __forceinline__ void nf4_dequant(const unsigned char *__restrict__ packed,
                                            const unsigned char *__restrict__ absmax_q,
                                            const float *__restrict__ code, const float *__restrict__ scale,
                                            const float *__restrict__ offset_p, const float *__restrict__ levels,
                                            T *__restrict__ out, long long n, int block_size) {
  __shared__ float lv[16];
  if (threadIdx.x < 16) lv[threadIdx.x] = levels[threadIdx.x];
  __syncthreads();
  const float offset = offset_p[0];
  const long long nv = n / V;  // V = 8: the host checked that 8 divides n and block_size
  for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < nv;
       k += (long long)gridDim.x * blockDim.x) {
    if (V == 8) {
      const unsigned int word = reinterpret_cast<const unsigned int *>(packed)[k];  // values 8k .. 8k+7
      const float a = tm_nf4_absmax(absmax_q, code, scale, offset, (8 * k) / block_size);
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned int byte = (word >> (8 * j)) & 0xffu;  // little-endian: byte j holds values 2j, 2j+1
        v[2 * j] = __fmul_rn(lv[byte >> 4], a);
        v[2 * j + 1] = __fmul_rn(lv[byte & 15u], a);
      }
      tm_store<T, 8>(out + 8 * k, v);  // out comes from torch's allocator: 16 (bf16) / 32 (fp32) B aligned
    } else {
      const unsigned int byte = packed[k >> 1];
      const unsigned int idx = (k & 1) ? (byte & 15u) : (byte >> 4);
      float v[1] = {__fmul_rn(lv[idx], tm_nf4_absmax(absmax_q, code, scale, offset, k / block_size))};
      tm_store<T, 1>(out + k, v);
    }
  }
}

#define TM_NF4(T, NAME, V)                                                                                 \
  extern "C" __global__ void __launch_bounds__(256)                                                       \
      nf4_dequant_##NAME##_v##V(const unsigned char *packed, const unsigned char *absmax_q, const float *code, \
                                const float *scale, const float *offset, const float *levels, T *out,     \
                                long long n, int block_size) {                                            \
    nf4_dequant<T, V>(packed, absmax_q, code, scale, offset, levels, out, n, block_size);                  \
  }

TM_NF4(bf16, bf16, 8)
TM_NF4(bf16, bf16, 1)
TM_NF4(float, f32, 8)
TM_NF4(float, f32, 1)
