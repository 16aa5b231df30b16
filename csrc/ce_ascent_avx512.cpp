// AVX-512 variants of the CPU kernels declared in cpu_kernels.h (x86-64 only).
//
// setup.py passes no -m flag: every function here carries its own target attribute,
// and ce_ascent.cpp calls them only after __builtin_cpu_supports says the CPU has the
// features. Everything else in the extension stays baseline code.
#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#define NOENCORE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define NOENCORE_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace noencore {
namespace avx512 {
namespace {

NOENCORE_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << left) - 1u);
}

// 2^x for x <= 0 on 16 lanes: x = k + f with k an integer and |f| <= 1/2, 2^f from its
// degree-6 Taylor polynomial in f ln2 (relative error < 1.2e-7), scaled by 2^k with one
// vscalefps. x is clamped at -126 (2^-126 is negligible next to the row's sum >= 1).
NOENCORE_AVX512 inline __m512 exp2_nonpos16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, k);
  __m512 p = _mm512_set1_ps(1.5403530393381608e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

// GEMM blocking. A micro-tile is kRows rows x kCols columns of c (kRows * 2 zmm
// accumulators); b is packed in panels of kCols columns, each panel k-pair-major in the
// layout vdpbf16ps reads ([k/2][kCols][2]), so one panel row is two zmm loads. A block of
// kBlockRows rows of a (kBlockRows x K bf16) stays in L2 while every panel passes.
constexpr int kCols = 32;
constexpr int kRows = 12;
constexpr int64_t kBlockRows = 48;

// c[r, 0:ncols] = a[r, :] . panel for the `rows` rows of one micro-tile. The k pairs
// are summed in blocks of kPairBlock, each from zero, and the block sums are added into
// c: one running sum over all of K had several times the rounding error of torch's fp32
// GEMM (per-token loss error up to 9e-6 against 1.4e-6 at K = 1024; 2.5e-6 blocked).
constexpr int64_t kPairBlock = 64;

// acc[r] += a[r, 2q:2q+2] . panel[q] for one k pair q; `half`: the last pair of an odd
// k, whose second value is not in a (and is 0 in the packed panel).
template <int rows, bool half>
NOENCORE_AVX512_BF16 inline void pair_step(__m512 (&acc)[rows][2], const uint16_t* a,
                                           int64_t lda, const uint16_t* panel, int64_t q) {
  const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + q * 2 * kCols);
  const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + q * 2 * kCols + kCols);
  for (int r = 0; r < rows; ++r) {
    int32_t two;  // the pair as one 32-bit lane, broadcast
    if (half) {
      two = a[r * lda + 2 * q];
    } else {
      std::memcpy(&two, a + r * lda + 2 * q, sizeof(two));
    }
    const __m512bh av = (__m512bh)_mm512_set1_epi32(two);
    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
  }
}

template <int rows>
NOENCORE_AVX512_BF16 inline void micro_tile(const uint16_t* a, int64_t lda,
                                            const uint16_t* panel, int64_t k, float* c,
                                            int64_t ldc, int64_t ncols) {
  const __mmask16 m0 = tail_mask(ncols), m1 = ncols > 16 ? tail_mask(ncols - 16) : 0;
  const int64_t pairs = (k + 1) / 2;
  for (int64_t q0 = 0; q0 < pairs; q0 += kPairBlock) {
    const int64_t q1 = q0 + kPairBlock < pairs ? q0 + kPairBlock : pairs;
    const int64_t full = q1 < k / 2 ? q1 : k / 2;
    __m512 acc[rows][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t q = q0; q < full; ++q) pair_step<rows, false>(acc, a, lda, panel, q);
    if (full < q1) pair_step<rows, true>(acc, a, lda, panel, full);
    for (int r = 0; r < rows; ++r) {
      float* cr = c + r * ldc;
      if (q0 > 0) {
        acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m0, cr));
        acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m1, cr + 16));
      }
      _mm512_mask_storeu_ps(cr, m0, acc[r][0]);
      _mm512_mask_storeu_ps(cr + 16, m1, acc[r][1]);
    }
  }
}

}  // namespace

NOENCORE_AVX512 bool max_expsum(const float* z, float* e, int64_t vocab, float* max_out,
                                float* sum_out) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 mv = ninf;
  __mmask16 nan = 0;
  for (int64_t v = 0; v < vocab; v += 16) {
    const __m512 x = _mm512_mask_loadu_ps(ninf, tail_mask(vocab - v), z + v);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);  // vmaxps would drop a NaN
    mv = _mm512_max_ps(mv, x);
  }
  const float m = _mm512_reduce_max_ps(mv);
  if (nan != 0 || m == __builtin_inff() || m == -__builtin_inff()) return false;
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 neg_m2 = _mm512_set1_ps(-m * 1.44269504088896341f);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t v = 0; v < vocab; v += 16) {
    const __mmask16 k = tail_mask(vocab - v);
    const __m512 ev = exp2_nonpos16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, z + v), log2e, neg_m2));
    acc = _mm512_mask_add_ps(acc, k, acc, ev);
    if (e != nullptr) _mm512_mask_storeu_ps(e + v, k, ev);
  }
  *max_out = m;
  *sum_out = _mm512_reduce_add_ps(acc);
  return true;
}

NOENCORE_AVX512 void scale(float* x, float sc, int64_t vocab) {
  const __m512 s = _mm512_set1_ps(sc);
  for (int64_t v = 0; v < vocab; v += 16) {
    const __mmask16 k = tail_mask(vocab - v);
    _mm512_mask_storeu_ps(x + v, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + v), s));
  }
}

NOENCORE_AVX512_BF16 void scale_to_bf16(const float* src, float sc, uint16_t* dst,
                                        int64_t vocab) {
  const __m512 s = _mm512_set1_ps(sc);
  for (int64_t v = 0; v < vocab; v += 16) {
    const __mmask16 k = tail_mask(vocab - v);
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, src + v), s));
    _mm256_mask_storeu_epi16(dst + v, k, (__m256i)packed);
  }
}

int64_t packed_panels(int64_t n) { return (n + kCols - 1) / kCols; }

int64_t packed_elems(int64_t n, int64_t k) { return packed_panels(n) * kCols * 2 * ((k + 1) / 2); }

void pack_b_panels(const uint16_t* b, int64_t n, int64_t k, int64_t p0, int64_t p1,
                   uint16_t* packed) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* panel = packed + p * kCols * 2 * pairs;
    for (int64_t j = 0; j < kCols; ++j) {
      const int64_t col = p * kCols + j;
      for (int64_t q = 0; q < pairs; ++q) {
        uint16_t* dst = panel + q * 2 * kCols + 2 * j;
        // Columns past n and the half-pair past an odd k are zeros.
        dst[0] = col < n ? b[col * k + 2 * q] : 0;
        dst[1] = col < n && 2 * q + 1 < k ? b[col * k + 2 * q + 1] : 0;
      }
    }
  }
}

NOENCORE_AVX512_BF16 void gemm_rows(const uint16_t* a, int64_t lda, const uint16_t* packed,
                                    int64_t n, int64_t k, int64_t r0, int64_t r1, float* c,
                                    int64_t ldc) {
  const int64_t panel_elems = kCols * 2 * ((k + 1) / 2);
  for (int64_t b0 = r0; b0 < r1; b0 += kBlockRows) {
    const int64_t b1 = b0 + kBlockRows < r1 ? b0 + kBlockRows : r1;
    for (int64_t p = 0; p < packed_panels(n); ++p) {
      const uint16_t* panel = packed + p * panel_elems;
      const int64_t ncols = n - p * kCols < kCols ? n - p * kCols : kCols;
      float* cp = c + p * kCols;
      int64_t r = b0;
      for (; r + kRows <= b1; r += kRows) {
        micro_tile<kRows>(a + r * lda, lda, panel, k, cp + r * ldc, ldc, ncols);
      }
      for (; r + 4 <= b1; r += 4) micro_tile<4>(a + r * lda, lda, panel, k, cp + r * ldc, ldc, ncols);
      for (; r < b1; ++r) micro_tile<1>(a + r * lda, lda, panel, k, cp + r * ldc, ldc, ncols);
    }
  }
}

}  // namespace avx512
}  // namespace noencore

#endif  // defined(__x86_64__)
