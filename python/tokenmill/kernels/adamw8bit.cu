// AdamW with 8-bit block-wise quantised moments (Dettmers et al., "8-bit Optimizers via Block-wise
// Quantization"). Each block of 256 elements stores its moments as uint8 indices into a sorted 256-entry
// dynamic code (signed for m, unsigned for v) times the block's fp32 absmax: 2 bytes + 8/256 per parameter.
// One update: dequantise, Adam moment update in fp32, decoupled weight decay, parameter step, new absmax,
// requantise to the nearest code (ties to the lower code).
//
// Bit-identical to the CPU reference (optim/adamw8bit.py: reference_step, quantize): every fp32 operation is
// an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, ...), which the compiler never contracts into an
// FMA, in the reference's order; sqrt and division are IEEE (correctly rounded).
#include "common.cuh"

#define TM_QBLOCK 256
#define TM_GROUPS 4  // quantisation blocks per CUDA block (256 threads, 64 per quantisation block)

// Nearest-code lookup without a search. The nearest code index r(x) (ties to the lower code, as the
// reference's searchsorted + tie rule computes it in fp32) is a non-decreasing step function of x, so
// r(x) = #{j : x >= T_j} for 255 thresholds T_j (smallest float with r >= j), computed on the host by
// bisection over all floats with the reference rule itself. The float's bit pattern, clamped to magnitudes
// [2^-23, 1], picks a bucket of 2^SHIFT consecutive patterns per sign; each bucket holds at most one
// threshold, so r = base[bucket] + (x >= T_{base+1}): one byte and one float from shared memory and a
// compare, instead of an 8-step binary search (8 dependent, bank-conflicting shared loads) plus the tie test.
// NaN takes the top positive bucket (r = 255), as torch.searchsorted sorts NaN last. Tables and the bucket
// width are built and checked (<= 1 threshold per bucket) by optim/adamw8bit.py: quant_tables.
#define TM_Q_LO 0x34000000u  // 2^-23: every smaller magnitude shares the first bucket (|T_j| >= 1.6e-7)
#define TM_Q_HI 0x3f800000u  // 1.0: every larger magnitude shares the last bucket
#define TM_Q1_SHIFT 17       // signed code (m): 6 mantissa bits per bucket
#define TM_Q2_SHIFT 16       // unsigned code (v): 7 mantissa bits (its codes are twice as dense)
#define TM_Q1_NB (((TM_Q_HI - TM_Q_LO) >> TM_Q1_SHIFT) + 1)
#define TM_Q2_NB (((TM_Q_HI - TM_Q_LO) >> TM_Q2_SHIFT) + 1)
// qtab layout (uint32 words): code1[256] code2[256] thr1[256] thr2[256] (fp32), base1[2 * NB1] base2[2 * NB2]
// (uint8, negative-side buckets after the positive ones, each padded to whole words)
#define TM_Q_BASE1 1024
#define TM_Q_BASE2 (TM_Q_BASE1 + (2 * TM_Q1_NB + 3) / 4)
#define TM_QTAB_WORDS (TM_Q_BASE2 + (2 * TM_Q2_NB + 3) / 4)

template <unsigned SHIFT, unsigned NB>
__device__ __forceinline__ unsigned char tm_quantize(const unsigned char *base, const float *thr, float x) {
  const unsigned u = __float_as_uint(x), a = u & 0x7fffffffu;
  const unsigned neg = (u >> 31) & (a <= 0x7f800000u ? 1u : 0u);  // NaN: positive side
  const unsigned c = a < TM_Q_LO ? TM_Q_LO : (a > TM_Q_HI ? TM_Q_HI : a);
  const unsigned b = base[neg * NB + ((c - TM_Q_LO) >> SHIFT)];
  return (unsigned char)(b + (x >= thr[b] ? 1u : 0u));  // thr[255] is NaN: never >=
}

// Multi-tensor step: one launch updates every tensor of a list (same dtype and hyper-parameters). Tensor t's
// quantisation blocks are numbered qb_start[t] .. qb_start[t + 1] - 1 in one global range (qb_start has
// n_tensors + 1 entries); table[6t .. 6t + 5] holds its device pointers p, g, q1, q2, absmax1, absmax2 and
// sizes[t] its element count. Each element is read once (p, g, two uint8 codes) and written once (p, codes);
// absmax once per 256 elements. The tensor of a quantisation block is looked up once per block (by its 64
// threads), not per element.
// Thread k of a quantisation block handles its elements 4k .. 4k + 3: one 16-byte (fp32) / 8-byte (bf16)
// access for p and g and one 4-byte access per code array when the block is whole and p and g are aligned
// (torch allocations are; views at odd offsets, e.g. FSDP shards, take the element-wise path).
template <typename T>
__device__ __forceinline__ void adamw8bit_multi(const unsigned long long *__restrict__ table,
                                                const long long *__restrict__ sizes,
                                                const long long *__restrict__ qb_start, int n_tensors,
                                                const unsigned int *__restrict__ qtab, float beta1, float beta2,
                                                float one_minus_beta1, float one_minus_beta2, float eps,
                                                float step_size, float inv_bc2_sqrt, float decay) {
  __shared__ unsigned int qs[TM_QTAB_WORDS];
  __shared__ float red1[2 * TM_GROUPS], red2[2 * TM_GROUPS];
  for (int i = threadIdx.x; i < TM_QTAB_WORDS; i += blockDim.x) qs[i] = qtab[i];
  __syncthreads();
  const float *c1 = reinterpret_cast<const float *>(qs), *c2 = c1 + 256, *thr1 = c1 + 512, *thr2 = c1 + 768;
  const unsigned char *base1 = reinterpret_cast<const unsigned char *>(qs + TM_Q_BASE1);
  const unsigned char *base2 = reinterpret_cast<const unsigned char *>(qs + TM_Q_BASE2);
  const int group = threadIdx.x >> 6, k = threadIdx.x & 63, warp = threadIdx.x >> 5;
  const long long n_qb = qb_start[n_tensors];
  int t_lo = 0;  // blocks advance through the tensors in order: the previous tensor bounds the search
  // Every thread runs the same number of iterations (the loop bound is block-uniform) for __syncthreads.
  for (long long first = (long long)blockIdx.x * TM_GROUPS; first < n_qb;
       first += (long long)gridDim.x * TM_GROUPS) {
    const long long gqb = first + group;
    const bool active = gqb < n_qb;
    // pointers to this quantisation block's first element / absmax; n: its element count (<= 256)
    T *p = nullptr;
    const T *g = nullptr;
    unsigned char *q1 = nullptr, *q2 = nullptr;
    float *absmax1 = nullptr, *absmax2 = nullptr;
    int n = 0;
    bool vec = false;
    if (active) {
      int lo = t_lo, hi = n_tensors - 1;  // the last tensor whose range starts at or before gqb
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (qb_start[mid] <= gqb) lo = mid;
        else hi = mid - 1;
      }
      t_lo = lo;
      const unsigned long long *e = table + 6 * (long long)lo;
      const long long qb = gqb - qb_start[lo], off = qb * TM_QBLOCK, left = sizes[lo] - off;
      p = reinterpret_cast<T *>(e[0]) + off;
      g = reinterpret_cast<const T *>(e[1]) + off;
      q1 = reinterpret_cast<unsigned char *>(e[2]) + off;
      q2 = reinterpret_cast<unsigned char *>(e[3]) + off;
      absmax1 = reinterpret_cast<float *>(e[4]) + qb;
      absmax2 = reinterpret_cast<float *>(e[5]) + qb;
      n = left < TM_QBLOCK ? (int)left : TM_QBLOCK;
      vec = n == TM_QBLOCK && ((e[0] | e[1]) & (4 * sizeof(T) - 1)) == 0 && ((e[2] | e[3]) & 3) == 0;
    }
    const float a1 = active ? *absmax1 : 0.f, a2 = active ? *absmax2 : 0.f;
    const int i0 = 4 * k;
    float m[4], v[4], pv[4], gv[4], max1 = 0.f, max2 = 0.f;
    unsigned char s1[4], s2[4];
    if (vec) {
      tm_load<T, 4>(p + i0, pv);
      tm_load<T, 4>(g + i0, gv);
      const TmVec<unsigned char, 4> u1 = *reinterpret_cast<const TmVec<unsigned char, 4> *>(q1 + i0);
      const TmVec<unsigned char, 4> u2 = *reinterpret_cast<const TmVec<unsigned char, 4> *>(q2 + i0);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s1[e] = u1.v[e];
        s2[e] = u2.v[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool in = i0 + e < n;  // n = 0 when inactive
        pv[e] = in ? tm_to_float(p[i0 + e]) : 0.f;
        gv[e] = in ? tm_to_float(g[i0 + e]) : 0.f;
        s1[e] = in ? q1[i0 + e] : 0;
        s2[e] = in ? q2[i0 + e] : 0;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      m[e] = 0.f;
      v[e] = 0.f;
      if (i0 + e < n) {
        // the reference's order: beta * dequantised + (1 - beta) * g (* g)
        m[e] = __fadd_rn(__fmul_rn(beta1, __fmul_rn(c1[s1[e]], a1)), __fmul_rn(one_minus_beta1, gv[e]));
        v[e] = __fadd_rn(__fmul_rn(beta2, __fmul_rn(c2[s2[e]], a2)),
                         __fmul_rn(__fmul_rn(one_minus_beta2, gv[e]), gv[e]));
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v[e]), inv_bc2_sqrt), eps);
        pv[e] = __fsub_rn(__fmul_rn(pv[e], decay), __fdiv_rn(__fmul_rn(step_size, m[e]), denom));
        max1 = fmaxf(max1, fabsf(m[e]));
        max2 = fmaxf(max2, v[e]);
      }
    }
    if (vec) {
      tm_store<T, 4>(p + i0, pv);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (i0 + e < n) tm_from_float(pv[e], p[i0 + e]);
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
      *absmax1 = max1;
      *absmax2 = max2;
    }
    const float inv1 = max1 > 0.f ? __fdiv_rn(1.f, max1) : 0.f, inv2 = max2 > 0.f ? __fdiv_rn(1.f, max2) : 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s1[e] = tm_quantize<TM_Q1_SHIFT, TM_Q1_NB>(base1, thr1, __fmul_rn(m[e], inv1));
      s2[e] = tm_quantize<TM_Q2_SHIFT, TM_Q2_NB>(base2, thr2, __fmul_rn(v[e], inv2));
    }
    if (vec) {
      TmVec<unsigned char, 4> u1, u2;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        u1.v[e] = s1[e];
        u2.v[e] = s2[e];
      }
      *reinterpret_cast<TmVec<unsigned char, 4> *>(q1 + i0) = u1;
      *reinterpret_cast<TmVec<unsigned char, 4> *>(q2 + i0) = u2;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (i0 + e < n) {
          q1[i0 + e] = s1[e];
          q2[i0 + e] = s2[e];
        }
    }
  }
}

// 5 blocks of 256 threads per SM (48 registers; unbounded, ptxas takes 57 and 4 blocks fit): the step is
// memory-bound once the lookup is cheap, and the extra resident block keeps more loads in flight.
#define TM_ADAMW8(T, NAME)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256, 5)                                                       \
      adamw8bit_##NAME(const unsigned long long *table, const long long *sizes, const long long *qb_start,    \
                       int n_tensors, const unsigned int *qtab, float beta1, float beta2,                     \
                       float one_minus_beta1, float one_minus_beta2, float eps, float step_size,              \
                       float inv_bc2_sqrt, float decay) {                                                    \
    adamw8bit_multi<T>(table, sizes, qb_start, n_tensors, qtab, beta1, beta2, one_minus_beta1,                \
                       one_minus_beta2, eps, step_size, inv_bc2_sqrt, decay);                                 \
  }

TM_ADAMW8(bf16, bf16)
TM_ADAMW8(float, f32)
