// The CPU kernels that exist in more than one instruction-set variant.
//
// ce_ascent.cpp holds the portable code (any CPU the compiler targets by default:
// x86-64 baseline, aarch64, ...) and picks a variant at run time; on x86-64,
// ce_ascent_avx512.cpp holds AVX-512 variants compiled through function target
// attributes, so the extension never runs an instruction the CPU lacks.
//
// Plain pointers only: the AVX-512 translation unit includes no torch header, so that
// no inline function of torch's (or of the C++ library's) is emitted there with
// AVX-512 code and then picked by the linker for the portable code too.
#pragma once

#include <cstdint>

namespace noencore {

// Ordered: a level implies the ones below it.
enum class Isa : int { kPortable = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

#if defined(__x86_64__)
namespace avx512 {

// Needs avx512f, avx512bw, avx512dq, avx512vl.
//
// Max of z [V] fp32 and sum of exp(z - max), also stored into e when e != nullptr (e may
// alias z). Returns false, having written nothing, when the row holds a NaN or its max
// is +-inf (the caller then follows torch.logsumexp's rules for such rows).
bool max_expsum(const float* z, float* e, int64_t vocab, float* max_out, float* sum_out);

// x[v] *= sc for v in [0, V).
void scale(float* x, float sc, int64_t vocab);

// Also needs avx512_bf16.
//
// dst[v] = bf16(src[v] * sc), rounded to nearest even (fp32 denormals flush to zero).
void scale_to_bf16(const float* src, float sc, uint16_t* dst, int64_t vocab);

// bf16 GEMM with fp32 accumulation and fp32 output: c[m, n] = sum_k a[m, k] * b[n, k].
// b [N, K] is first packed (pack_b_panels over panel indices [p0, p1) of
// packed_panels(n)) into packed_elems(n, k) bf16 values; gemm_rows then computes rows
// [r0, r1) of c (row stride ldc) from a (row stride lda).
int64_t packed_panels(int64_t n);
int64_t packed_elems(int64_t n, int64_t k);
void pack_b_panels(const uint16_t* b, int64_t n, int64_t k, int64_t p0, int64_t p1,
                   uint16_t* packed);
void gemm_rows(const uint16_t* a, int64_t lda, const uint16_t* packed, int64_t n, int64_t k,
               int64_t r0, int64_t r1, float* c, int64_t ldc);

}  // namespace avx512
#endif

}  // namespace noencore
