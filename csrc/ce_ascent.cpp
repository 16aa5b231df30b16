// Fused cross-entropy with ascent on CPU: the work between the GEMMs, in one pass per row.
//
// linear_ce_fwd: for each chunk of rows, logits = h @ W^T (at::mm, BLAS/oneDNN), then one
// OpenMP-parallel pass per row that computes max, sum of exp, the loss and, in place over
// the logits, the gradient coef * (softmax - onehot); then dh = dz @ W and dW += dz^T @ h.
// Only one [chunk, V] logits buffer ever exists. bf16 inputs use bf16 GEMMs (AVX-512 bf16)
// with the softmax math in fp32 and round-to-nearest-even back to bf16.
//
// Kernel contract (shared with noencore/ops/reference.py and the Triton kernels):
// loss_n = lse(z_n) - z_n[t_n] (unweighted, 0 for ignored rows); the gradient row is
// coef_n * (p_n - onehot_n), zero when the row is ignored, or when coef_n < 0 and
// loss_n > cap. Random labels: targets == -2 and key >= 0 -> fmix32(key ^ row) % V
// (documented in noencore/ops/random_labels.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRandomLabel = -2;

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

inline int64_t resolve_label(int64_t t, int64_t ignore_index, int64_t key, int64_t row,
                             int64_t vocab) {
  if (t == ignore_index) return -1;
  if (t == kRandomLabel && key >= 0) {
    return static_cast<int64_t>(fmix32(static_cast<uint32_t>(key) ^ static_cast<uint32_t>(row)) %
                                static_cast<uint32_t>(vocab));
  }
  return t;
}

// exp for x <= 0 (arguments are z - max): range reduction to 2^k * e^r, |r| <= ln2/2, and a
// degree-6 Taylor polynomial (relative error < 2e-7). Written branch-free so that GCC turns
// the loops that call it into AVX-512 code; std::exp would stay scalar.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);  // keeps 2^k a normal float; e^-87 is negligible next to 1
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693145751953125f) - k * 1.428606820309417232e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float bf16_to_f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t f_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// dst[v] = bf16(src[v] * sc), rounded to nearest even. With AVX-512 BF16 one instruction
// converts 16 floats (it also flushes fp32 denormals, ~1e-38, to zero); otherwise the
// integer rounding of f_to_bf16.
inline void scale_to_bf16(const float* src, float sc, uint16_t* dst, int64_t vocab) {
  int64_t v = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const __m512 scale = _mm512_set1_ps(sc);
  for (; v + 16 <= vocab; v += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + v), scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + v), reinterpret_cast<const __m256i&>(packed));
  }
#endif
  for (; v < vocab; ++v) dst[v] = f_to_bf16(src[v] * sc);
}

#if defined(__AVX512F__)
// 2^x for x <= 0 on 16 lanes: x = k + f with k an integer and |f| <= 1/2, 2^f from its
// degree-6 Taylor polynomial in f ln2 (relative error < 1.2e-7), scaled by 2^k with one
// vscalefps. x is clamped at -126 (2^-126 is negligible next to the row's sum >= 1).
inline __m512 exp2_nonpos16(__m512 x) {
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

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << left) - 1u);
}
#endif

// Max of z [V] fp32, then sum of exp(z - max), also stored into e when e != nullptr
// (e may alias z). Returns the sum; *max_out gets the max.
inline float max_expsum(const float* z, float* e, int64_t vocab, float* max_out) {
#if defined(__AVX512F__)
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mv = ninf;
  for (int64_t v = 0; v < vocab; v += 16) {
    mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(ninf, tail_mask(vocab - v), z + v));
  }
  const float m = _mm512_reduce_max_ps(mv);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 neg_m2 = _mm512_set1_ps(-m * 1.44269504088896341f);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t v = 0; v < vocab; v += 16) {
    const __mmask16 k = tail_mask(vocab - v);
    const __m512 ev = exp2_nonpos16(
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, z + v), log2e, neg_m2));
    acc = _mm512_mask_add_ps(acc, k, acc, ev);
    if (e != nullptr) _mm512_mask_storeu_ps(e + v, k, ev);
  }
  *max_out = m;
  return _mm512_reduce_add_ps(acc);
#else
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, z[v]);
  float s = 0.0f;
  if (e == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < vocab; ++v) s += exp_nonpos(z[v] - m);
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < vocab; ++v) {
      const float ev = exp_nonpos(z[v] - m);
      e[v] = ev;
      s += ev;
    }
  }
  *max_out = m;
  return s;
#endif
}

// Rows [0, n) of a contiguous [n, V] logits block (fp32 or bf16) starting at global row
// `row0`: losses into loss[0..n), gradients (if grad != nullptr, same dtype, may alias).
// Per row: one read of the logits, exp(z - max) kept in an L1/L2-resident fp32 row, one
// write of c * (softmax - onehot).
void rows_block(const void* logits, void* grad, bool bf16, int64_t n, int64_t vocab,
                const int64_t* targets, const float* coef, int64_t ignore_index, int64_t key,
                int64_t row0, float cap, float* loss) {
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(bf16 ? vocab : 0);
    for (int64_t r = b; r < e; ++r) {
      const int64_t label = resolve_label(targets[r], ignore_index, key, row0 + r, vocab);
      float m = 0.0f, s = 0.0f, zt = 0.0f;
      float* ex = nullptr;  // exp(z - max), fp32
      if (bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(logits) + r * vocab;
        if (label >= 0) zt = bf16_to_f(src[label]);
        ex = scratch.data();
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) ex[v] = bf16_to_f(src[v]);  // widen, in L1/L2
        s = max_expsum(ex, ex, vocab, &m);
      } else {
        const float* src = static_cast<const float*>(logits) + r * vocab;
        if (label >= 0) zt = src[label];
        // With a gradient output, exp lands there directly (it is scaled in place below).
        ex = grad ? static_cast<float*>(grad) + r * vocab : nullptr;
        s = max_expsum(src, ex, vocab, &m);
      }
      const float l = label >= 0 ? (m + std::log(s)) - zt : 0.0f;
      loss[r] = l;
      if (grad == nullptr) continue;
      float c = coef[r];
      if (label < 0 || (c < 0.0f && l > cap)) c = 0.0f;
      const float sc = c / s;
      if (bf16) {
        uint16_t* dst = static_cast<uint16_t*>(grad) + r * vocab;
        scale_to_bf16(ex, sc, dst, vocab);
        if (label >= 0) dst[label] = f_to_bf16(ex[label] * sc - c);
      } else {
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) ex[v] *= sc;
        if (label >= 0) ex[label] -= c;
      }
    }
  });
}

void check_common(const at::Tensor& targets, const at::Tensor& coef, int64_t n) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must be [N]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == n && coef.scalar_type() == at::kFloat &&
                  coef.is_contiguous(),
              "coef must be contiguous float32 [N]");
}

void check_loss(const at::Tensor& loss, int64_t n) {
  TORCH_CHECK(loss.dim() == 1 && loss.size(0) == n && loss.scalar_type() == at::kFloat &&
                  loss.is_contiguous(),
              "loss must be contiguous float32 [N]");
}

bool check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_cuda(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous 2-D tensor");
  return t.scalar_type() == at::kBFloat16;
}

}  // namespace

// Loss of logits [N, V] into `loss` [N] fp32; gradient rows written into `grad` (same
// shape/dtype, may be the logits themselves) when given. Every output element is written.
void ce_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& coef,
            int64_t ignore_index, int64_t key, int64_t row_offset, double cap,
            const at::Tensor& loss, const c10::optional<at::Tensor>& grad) {
  const bool bf16 = check_float(logits, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_common(targets, coef, n);
  check_loss(loss, n);
  void* gptr = nullptr;
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == logits.scalar_type() &&
                    grad->is_contiguous(),
                "grad must be contiguous, with the logits' shape and dtype");
    gptr = grad->data_ptr();
  }
  rows_block(logits.data_ptr(), gptr, bf16, n, vocab, targets.data_ptr<int64_t>(),
             coef.data_ptr<float>(), ignore_index, key, row_offset, static_cast<float>(cap),
             loss.data_ptr<float>());
}

// Per-row loss [N] fp32 into `loss` and, when given, dh [N, D] (hidden's dtype) and
// dW [V, D] (weight's dtype) of sum_n coef_n * loss_n, with logits formed `chunk` rows at a time.
// Every element of the given outputs is overwritten (dW is not accumulated into).
void linear_ce_fwd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                   const at::Tensor& coef, int64_t ignore_index, int64_t key, int64_t row_offset,
                   double cap, const at::Tensor& loss, const c10::optional<at::Tensor>& dh_opt,
                   const c10::optional<at::Tensor>& dw_opt, int64_t chunk) {
  const bool bf16 = check_float(hidden, "hidden");
  check_float(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "hidden [N, D] and weight [V, D] disagree on D");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  check_common(targets, coef, n);
  check_loss(loss, n);
  const bool need_dh = dh_opt.has_value() && dh_opt->defined();
  const bool need_dw = dw_opt.has_value() && dw_opt->defined();
  if (need_dh) {
    TORCH_CHECK(dh_opt->sizes() == hidden.sizes() && dh_opt->scalar_type() == hidden.scalar_type() &&
                    dh_opt->is_contiguous(),
                "dh must be contiguous, with hidden's shape and dtype");
  }
  if (need_dw) {
    TORCH_CHECK(dw_opt->sizes() == weight.sizes() && dw_opt->scalar_type() == weight.scalar_type() &&
                    dw_opt->is_contiguous(),
                "dw must be contiguous, with weight's shape and dtype");
  }
  const bool need_grad = need_dh || need_dw;
  if (n == 0) {
    if (need_dw) dw_opt->zero_();
    return;
  }
  // Equal chunks of at most `chunk` rows (6000 rows -> 2 x 3000, not 4096 + 1904: a
  // small last GEMM runs well below the rate of the others).
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int64_t rows = (n + n_chunks - 1) / n_chunks;
  at::Tensor buf = at::empty({rows, vocab}, hidden.options());
  // dW accumulates in the GEMM's output (fp32 inside the GEMM, rounded to the weight's
  // dtype between chunks). For bf16 with many chunks that rounding would add up, so
  // beyond kMaxBf16Chunks the sum is kept in an fp32 buffer instead.
  constexpr int64_t kMaxBf16Chunks = 4;
  at::Tensor dw_acc;
  if (need_dw && bf16 && n_chunks > kMaxBf16Chunks) {
    dw_acc = at::empty({vocab, d}, hidden.options().dtype(at::kFloat));
  }
  const at::Tensor wt = weight.t();
  for (int64_t s = 0; s < n; s += rows) {
    const int64_t c = std::min(rows, n - s);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::Tensor z = buf.narrow(0, 0, c);
    at::mm_out(z, h, wt);
    rows_block(z.data_ptr(), need_grad ? z.data_ptr() : nullptr, bf16, c, vocab,
               targets.data_ptr<int64_t>() + s, coef.data_ptr<float>() + s, ignore_index, key,
               row_offset + s, static_cast<float>(cap), loss.data_ptr<float>() + s);
    if (need_dh) {
      at::Tensor out = dh_opt->narrow(0, s, c);
      at::mm_out(out, z, weight);
    }
    if (need_dw) {
      at::Tensor dw = *dw_opt;
      if (s == 0 || dw_acc.defined()) {
        at::mm_out(dw, z.t(), h);  // overwrites: dw may hold anything on entry
      } else {
        dw.addmm_(z.t(), h);
      }
      if (dw_acc.defined()) {  // bf16, many chunks: this chunk's part goes into fp32
        if (s == 0) {
          dw_acc.copy_(dw);
        } else {
          dw_acc.add_(dw);
        }
      }
    }
  }
  if (dw_acc.defined()) dw_opt->copy_(dw_acc);
}

// Per-row statistics (no gradient) with fp32 logits formed `chunk` rows at a time: nll,
// correct (first argmax == label), and the mean / variance of log p under the row's own
// distribution. Ignored rows get NaN and false. All outputs are [N] and fully written.
void token_stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                 int64_t ignore_index, int64_t key, int64_t row_offset, int64_t chunk,
                 const at::Tensor& nll, const at::Tensor& correct, const at::Tensor& mean,
                 const at::Tensor& var) {
  check_float(hidden, "hidden");
  check_float(weight, "weight");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "hidden [N, D] and weight [V, D] disagree on D");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous(),
              "targets must be contiguous int64 [N]");
  check_loss(nll, n);
  check_loss(mean, n);
  check_loss(var, n);
  TORCH_CHECK(correct.dim() == 1 && correct.size(0) == n && correct.scalar_type() == at::kBool &&
                  correct.is_contiguous(),
              "correct must be contiguous bool [N]");
  if (n == 0) return;
  const at::Tensor w32 = weight.to(at::kFloat).t();
  const int64_t rows = std::min(chunk, n);
  at::Tensor buf = at::empty({rows, vocab}, hidden.options().dtype(at::kFloat));
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* nllp = nll.data_ptr<float>();
  bool* okp = correct.data_ptr<bool>();
  float* mup = mean.data_ptr<float>();
  float* varp = var.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t s0 = 0; s0 < n; s0 += rows) {
    const int64_t c = std::min(rows, n - s0);
    at::Tensor z = buf.narrow(0, 0, c);
    at::mm_out(z, hidden.narrow(0, s0, c).to(at::kFloat), w32);
    const float* zp = z.data_ptr<float>();
    at::parallel_for(0, c, 4, [&](int64_t b, int64_t e) {
      std::vector<float> ex(vocab);
      for (int64_t r = b; r < e; ++r) {
        const int64_t g = s0 + r;
        const int64_t label = resolve_label(tp[g], ignore_index, key, row_offset + g, vocab);
        if (label < 0) {
          nllp[g] = mup[g] = varp[g] = nan;
          okp[g] = false;
          continue;
        }
        const float* zr = zp + r * vocab;
        float m = 0.0f;
        const float sum = max_expsum(zr, ex.data(), vocab, &m);
        // With d = z - max: mu = E[d] - log(sum), var = E[d^2] - E[d]^2 (double sums:
        // the difference cancels when the distribution is peaked).
        double a = 0.0, q = 0.0;
#pragma omp simd reduction(+ : a, q)
        for (int64_t v = 0; v < vocab; ++v) {
          const double d = static_cast<double>(zr[v]) - m;
          a += ex[v] * d;
          q += ex[v] * d * d;
        }
        const double ed = a / sum, log_s = std::log(static_cast<double>(sum));
        int64_t arg = 0;
        while (arg + 1 < vocab && zr[arg] != m) ++arg;  // first maximum, as torch.argmax
        nllp[g] = static_cast<float>(m + log_s - zr[label]);
        okp[g] = arg == label;
        mup[g] = static_cast<float>(ed - log_s);
        varp[g] = static_cast<float>(std::max(q / sum - ed * ed, 0.0));
      }
    });
  }
}

// Random labels of global rows [row_offset, row_offset + n) (for cross-backend tests).
at::Tensor random_labels(int64_t key, int64_t row_offset, int64_t n, int64_t vocab) {
  TORCH_CHECK(key >= 0 && vocab > 0 && n >= 0, "bad random_labels arguments");
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) p[i] = resolve_label(kRandomLabel, -100, key, row_offset + i, vocab);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noencore C++ CPU kernels: fused cross-entropy with ascent";
  m.def("ce_fwd", &ce_fwd, "per-row CE loss and gradient (optionally in place) on logits [N, V]");
  m.def("linear_ce_fwd", &linear_ce_fwd, "fused linear head + CE: loss, dh, dW into given outputs");
  m.def("random_labels", &random_labels, "random labels of a row range");
  m.def("token_stats", &token_stats, "per-row nll, top-1, log-prob mean and variance");
}
