// Fused cross-entropy with ascent on CPU: the work between the GEMMs, in one pass per row.
//
// linear_ce_fwd: for each chunk of rows, fp32 logits z = h @ W^T (fp32 accumulation and
// fp32 output, also for bf16 inputs: see LogitsGemm), then one OpenMP-parallel pass per
// row that computes max, sum of exp, the loss and the gradient coef * (softmax - onehot),
// written in the inputs' dtype over the logits' own rows; then dh = dz @ W and
// dW += dz^T @ h, in the inputs' dtype (bf16 GEMMs for bf16 inputs). Only one
// [chunk, V] fp32 logits buffer ever exists.
//
// Instruction sets: this file is baseline code for whatever CPU the compiler targets
// (setup.py passes no -march). On x86-64 the AVX-512 variants of ce_ascent_avx512.cpp
// are chosen at run time from what the CPU reports; NOENCORE_CPU_ISA=portable|avx512
// lowers the choice (tests compare the paths), and isa() says which one runs.
//
// Kernel contract (shared with noencore/ops/reference.py and the Triton kernels):
// loss_n = lse(z_n) - z_n[t_n] (unweighted, 0 for ignored rows), and lse(z_n) itself
// (NaN for ignored rows, whose logits are not read), from the same pass; the gradient row is
// coef_n * (p_n - onehot_n), exactly zero when the row is ignored, and zero when
// coef_n < 0 and loss_n > cap. Non-finite logits follow torch: a NaN gives a NaN loss
// and a NaN gradient row; a +inf max gives lse = +inf. Random labels: targets == -2 and
// key >= 0 -> fmix32(key ^ row) % V (documented in noencore/ops/random_labels.py).
// Targets outside [0, V) that are neither ignore_index nor a random label are refused
// before anything is written.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace {

using noencore::Isa;

constexpr int64_t kRandomLabel = -2;
constexpr const char* kIsaNames[] = {"portable", "avx512", "avx512_bf16"};

// What this CPU can run (x86-64: avx512_bf16 also needs the four AVX-512 base features).
Isa detected_isa() {
#if defined(__x86_64__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl")) {
      return Isa::kPortable;
    }
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  }();
  return isa;
#else
  return Isa::kPortable;
#endif
}

// The detected level, lowered by NOENCORE_CPU_ISA when set (read at every call, so that
// a test can switch paths within one process).
Isa active_isa() {
  Isa cap = Isa::kAvx512Bf16;
  const char* req = std::getenv("NOENCORE_CPU_ISA");
  if (req != nullptr && *req != '\0') {
    bool known = false;
    for (int i = 0; i <= static_cast<int>(Isa::kAvx512Bf16); ++i) {
      if (std::strcmp(req, kIsaNames[i]) == 0) {
        cap = static_cast<Isa>(i);
        known = true;
      }
    }
    TORCH_CHECK(known, "NOENCORE_CPU_ISA=", req, " is not one of portable, avx512, avx512_bf16");
  }
  return std::min(detected_isa(), cap);
}

// NOENCORE_CPU_DEBUG=1 (read at every call; for tests and `make sanitize`): every scratch
// buffer starts as NaN instead of whatever the allocator held, and the gradient GEMMs
// read their operands the way AMX kernels may (see widen_k): an element that the kernels
// rely on but never wrote, or junk next to a matrix that a GEMM can read, shows as NaN
// on any CPU, not only on the CPUs whose GEMMs happen to read it.
bool debug_mode() {
  const char* v = std::getenv("NOENCORE_CPU_DEBUG");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// at::empty, NaN-filled in debug mode.
at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool debug) {
  at::Tensor t = at::empty(sizes, options);
  if (debug) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// Debug mode: the operands of a @ b as a GEMM that over-reads a along K sees them. oneDNN's
// AMX bf16 kernels (brgemm, "extendable K") load a whole 32-element K tile from a, past
// its last column up to the row stride, and rely on b being zero-padded along K: junk
// there that is NaN or inf as bf16 gives 0 * NaN = NaN in the product. Here a is widened
// to all `k_avail` elements its memory holds along K (its row stride, or the rows of its
// buffer when a is a transposed view) and b gets zero rows to match, so the product is
// NaN exactly when that memory holds a non-finite value. Outside debug mode: unchanged.
std::pair<at::Tensor, at::Tensor> widen_k(const at::Tensor& a, const at::Tensor& b,
                                          int64_t k_avail, bool debug) {
  const int64_t k = a.size(1);
  if (!debug || k_avail <= k) return {a, b};
  at::Tensor wide = a.as_strided({a.size(0), k_avail}, a.strides(), a.storage_offset());
  at::Tensor pad = at::zeros({k_avail - k, b.size(1)}, b.options());
  return {wide, at::cat({b, pad}, 0)};
}

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
// degree-6 Taylor polynomial (relative error < 2e-7). Branch-free, and rounding by the
// 1.5 * 2^23 trick rather than std::nearbyint (a libm call without SSE4.1), so that the
// portable loops that call it vectorise with the baseline instruction set.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);  // keeps 2^k a normal float; e^-87 is negligible next to 1
  constexpr float kRound = 12582912.0f;
  const float k = (x * 1.44269504088896341f + kRound) - kRound;
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

inline uint16_t f_to_bf16(float f) {  // round to nearest even; a NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Portable twin of avx512::max_expsum (same contract, cpu_kernels.h).
bool max_expsum_portable(const float* z, float* e, int64_t vocab, float* max_out,
                         float* sum_out) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t v = 0; v < vocab; ++v) {
    nan |= z[v] != z[v];  // std::max would drop a NaN
    m = std::max(m, z[v]);
  }
  if (nan != 0 || std::isinf(m)) return false;
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
  *sum_out = s;
  return true;
}

bool max_expsum(Isa isa, const float* z, float* e, int64_t vocab, float* max_out,
                float* sum_out) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) return noencore::avx512::max_expsum(z, e, vocab, max_out, sum_out);
#endif
  return max_expsum_portable(z, e, vocab, max_out, sum_out);
}

void scale(Isa isa, float* x, float sc, int64_t vocab) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512) return noencore::avx512::scale(x, sc, vocab);
#endif
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) x[v] *= sc;
}

void scale_to_bf16(Isa isa, const float* src, float sc, uint16_t* dst, int64_t vocab) {
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512Bf16) return noencore::avx512::scale_to_bf16(src, sc, dst, vocab);
#endif
  for (int64_t v = 0; v < vocab; ++v) dst[v] = f_to_bf16(src[v] * sc);
}

// torch.logsumexp of a row that max_expsum declined: NaN if the row holds a NaN,
// otherwise its max (+inf; or -inf when every logit is -inf).
float lse_nonfinite(const float* z, int64_t vocab) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) {
    if (std::isnan(z[v])) return z[v];
    m = std::max(m, z[v]);
  }
  return m;
}

// The rows' inputs and outputs apart from the logits and gradients themselves.
struct RowArgs {
  const int64_t* targets;
  const float* coef;
  int64_t ignore_index, key, row0;  // row0: global index of row 0 (random labels)
  float cap;
  float* loss;
  float* lse;  // logsumexp of each row (NaN for ignored rows)
  bool debug;  // NOENCORE_CPU_DEBUG: the per-thread fp32 row starts as NaN
};

// Rows [0, n) of contiguous [n, V] logits, fp32 or bf16: losses and logsumexps into
// args.loss and args.lse and, when
// grad != nullptr, gradient rows of dtype fp32 or bf16 with row stride g_stride elements.
// grad may alias the logits: the same rows in the same dtype, or (bf16 gradients over
// fp32 logits, g_stride = 2V) the first half of each logits row. Per row: one read of
// the logits, exp(z - max) kept in the gradient row or an L1/L2-resident fp32 row, one
// write of c * (softmax - onehot). Elements [V, g_stride) of each gradient row (the rest
// of the fp32 logits row under bf16 gradients) are set to 0 once the row is done: the
// GEMMs that read these rows may load past column V-1 up to the row stride (AMX K tails
// in oneDNN), and logits bits read as bf16 there can be NaN or inf (0 * NaN = NaN).
void rows_block(Isa isa, const void* logits, bool z_bf16, void* grad, bool g_bf16,
                int64_t g_stride, int64_t n, int64_t vocab, const RowArgs& args) {
  at::parallel_for(0, n, 4, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(z_bf16 || g_bf16 ? vocab : 0);
    if (args.debug) std::fill(scratch.begin(), scratch.end(), std::numeric_limits<float>::quiet_NaN());
    for (int64_t r = b; r < e; ++r) {
      const int64_t label =
          resolve_label(args.targets[r], args.ignore_index, args.key, args.row0 + r, vocab);
      uint16_t* g16 = nullptr;  // the row's gradient, bf16 or fp32 (or none)
      float* g32 = nullptr;
      if (grad != nullptr && g_bf16) g16 = static_cast<uint16_t*>(grad) + r * g_stride;
      if (grad != nullptr && !g_bf16) g32 = static_cast<float*>(grad) + r * g_stride;
      if (label < 0) {  // ignored: loss 0 and a gradient of exactly 0, whatever the logits
        args.loss[r] = 0.0f;
        args.lse[r] = std::numeric_limits<float>::quiet_NaN();
        if (g16 != nullptr) std::fill(g16, g16 + g_stride, uint16_t{0});  // padding too
        if (g32 != nullptr) std::fill(g32, g32 + g_stride, 0.0f);
        continue;
      }
      const float* zf;  // the row in fp32
      if (z_bf16) {
        const uint16_t* src = static_cast<const uint16_t*>(logits) + r * vocab;
#pragma omp simd
        for (int64_t v = 0; v < vocab; ++v) scratch[v] = bf16_to_f(src[v]);  // in L1/L2
        zf = scratch.data();
      } else {
        zf = static_cast<const float*>(logits) + r * vocab;
      }
      const float zt = zf[label];
      // exp(z - max): in the fp32 gradient row itself (scaled in place below).
      float* ex = g16 != nullptr ? scratch.data() : g32;
      float m = 0.0f, s = 0.0f;
      const bool finite = max_expsum(isa, zf, ex, vocab, &m, &s);
      const float lse = finite ? m + std::log(s) : lse_nonfinite(zf, vocab);
      const float l = lse - zt;
      args.loss[r] = l;
      args.lse[r] = lse;
      if (grad == nullptr) continue;
      float c = args.coef[r];
      if (c < 0.0f && l > args.cap) c = 0.0f;
      if (finite) {
        const float sc = c / s;
        if (g_bf16) {
          scale_to_bf16(isa, ex, sc, g16, vocab);
          g16[label] = f_to_bf16(ex[label] * sc - c);
        } else {
          scale(isa, ex, sc, vocab);
          ex[label] -= c;
        }
      } else {
        // IEEE arithmetic as torch does it: NaN where z - lse is NaN or inf - inf. When the
        // gradient shares the logits' memory, its element v covers no logit past z[v],
        // and z[v] has been read by then.
        for (int64_t v = 0; v < vocab; ++v) {
          const float g = c * (std::exp(zf[v] - lse) - (v == label ? 1.0f : 0.0f));
          if (g16 != nullptr) g16[v] = f_to_bf16(g);
          else g32[v] = g;
        }
      }
      if (g16 != nullptr) std::fill(g16 + vocab, g16 + g_stride, uint16_t{0});
      if (g32 != nullptr) std::fill(g32 + vocab, g32 + g_stride, 0.0f);
    }
  });
}

// fp32 logits [c, V] = h [c, D] @ W^T for one head W [V, D], with fp32 accumulation and
// an fp32 result whatever the inputs' dtype (so that losses, caps and row targets read
// the same numbers as the reference). fp32: at::mm. bf16: with avx512_bf16, a vdpbf16ps
// GEMM on W packed once per call (the products of bf16 values are exact in fp32); else
// an fp32 GEMM on fp32 copies (exact too, several times slower).
class LogitsGemm {
 public:
  LogitsGemm(const at::Tensor& weight, Isa isa, bool debug) : weight_(weight) {
    if (weight.scalar_type() != at::kBFloat16) return;
#if defined(__x86_64__)
    if (isa >= Isa::kAvx512Bf16) {
      const int64_t vocab = weight.size(0), d = weight.size(1);
      packed_ = scratch_empty({noencore::avx512::packed_elems(vocab, d)}, weight.options(), debug);
      const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
      auto* p = static_cast<uint16_t*>(packed_.data_ptr());
      at::parallel_for(0, noencore::avx512::packed_panels(vocab), 1, [&](int64_t b, int64_t e) {
        noencore::avx512::pack_b_panels(w, vocab, d, b, e, p);
      });
      return;
    }
#endif
    w32_t_ = weight.to(at::kFloat).t();
  }

  void operator()(const at::Tensor& h, at::Tensor& z) const {
    if (weight_.size(1) == 0) {  // D = 0: empty sums (the bf16 GEMM would write nothing)
      z.zero_();
    } else if (weight_.scalar_type() == at::kFloat) {
      at::mm_out(z, h, weight_.t());
    } else if (w32_t_.defined()) {
      at::mm_out(z, h.to(at::kFloat), w32_t_);
    } else {
#if defined(__x86_64__)
      const int64_t vocab = weight_.size(0), d = weight_.size(1);
      const auto* a = static_cast<const uint16_t*>(h.data_ptr());
      const auto* p = static_cast<const uint16_t*>(packed_.data_ptr());
      float* out = z.data_ptr<float>();
      at::parallel_for(0, h.size(0), 48, [&](int64_t b, int64_t e) {
        noencore::avx512::gemm_rows(a, d, p, vocab, d, b, e, out, vocab);
      });
#endif
    }
  }

 private:
  at::Tensor weight_;
  at::Tensor packed_;  // bf16 W in the GEMM's panel layout (avx512_bf16)
  at::Tensor w32_t_;   // fp32 W^T (bf16 without avx512_bf16)
};

void check_common(const at::Tensor& targets, const at::Tensor& coef, int64_t n) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n, "targets must be [N]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous(),
              "targets must be contiguous int64");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == n && coef.scalar_type() == at::kFloat &&
                  coef.is_contiguous(),
              "coef must be contiguous float32 [N]");
}

// Every target is a class in [0, V), ignore_index, or RANDOM_LABEL with a key: the
// kernels index rows with them, so nothing is written before this holds.
void check_targets(const at::Tensor& targets, int64_t ignore_index, int64_t key, int64_t vocab) {
  TORCH_CHECK(vocab > 0, "the vocabulary is empty (V = 0): there is no class to score");
  const int64_t* t = targets.data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] == ignore_index || (t[i] == kRandomLabel && key >= 0)) continue;
    TORCH_CHECK(t[i] >= 0 && t[i] < vocab, "targets[", i, "] = ", t[i],
                " is not a class in [0, ", vocab, "), ignore_index (", ignore_index,
                ") or RANDOM_LABEL (", kRandomLabel, ", with a key >= 0)");
  }
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

// Loss and logsumexp of logits [N, V] into `loss` and `lse` ([N] fp32); gradient rows
// written into `grad` (same shape/dtype, may be the logits themselves) when given. Every
// output element is written.
void ce_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& coef,
            int64_t ignore_index, int64_t key, int64_t row_offset, double cap,
            const at::Tensor& loss, const at::Tensor& lse, const c10::optional<at::Tensor>& grad) {
  const bool bf16 = check_float(logits, "logits");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  check_common(targets, coef, n);
  check_loss(loss, n);
  check_loss(lse, n);
  void* gptr = nullptr;
  if (grad.has_value() && grad->defined()) {
    TORCH_CHECK(grad->sizes() == logits.sizes() && grad->scalar_type() == logits.scalar_type() &&
                    grad->is_contiguous(),
                "grad must be contiguous, with the logits' shape and dtype");
    gptr = grad->data_ptr();
  }
  check_targets(targets, ignore_index, key, vocab);
  const RowArgs args{targets.data_ptr<int64_t>(), coef.data_ptr<float>(), ignore_index, key,
                     row_offset, static_cast<float>(cap), loss.data_ptr<float>(),
                     lse.data_ptr<float>(), debug_mode()};
  rows_block(active_isa(), logits.data_ptr(), bf16, gptr, bf16, vocab, n, vocab, args);
}

// Per-row loss and logsumexp ([N] fp32) into `loss` and `lse` and, when given, dh [N, D]
// (hidden's dtype) and
// dW [V, D] (weight's dtype) of sum_n coef_n * loss_n, with fp32 logits formed `chunk`
// rows at a time. Every element of the given outputs is overwritten (dW is not
// accumulated into).
void linear_ce_fwd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                   const at::Tensor& coef, int64_t ignore_index, int64_t key, int64_t row_offset,
                   double cap, const at::Tensor& loss, const at::Tensor& lse,
                   const c10::optional<at::Tensor>& dh_opt,
                   const c10::optional<at::Tensor>& dw_opt, int64_t chunk) {
  const bool bf16 = check_float(hidden, "hidden");
  check_float(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "hidden and weight dtypes differ");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "hidden [N, D] and weight [V, D] disagree on D");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  check_common(targets, coef, n);
  check_loss(loss, n);
  check_loss(lse, n);
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
  check_targets(targets, ignore_index, key, vocab);
  const bool need_grad = need_dh || need_dw;
  if (n == 0) {
    if (need_dw) dw_opt->zero_();
    return;
  }
  const Isa isa = active_isa();
  const bool debug = debug_mode();
  const LogitsGemm logits_of(weight, isa, debug);
  // Equal chunks of at most `chunk` rows (6000 rows -> 2 x 3000, not 4096 + 1904: a
  // small last GEMM runs well below the rate of the others).
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int64_t rows = (n + n_chunks - 1) / n_chunks;
  // One fp32 logits buffer for every chunk, followed by kSlack floats of zeros: a GEMM
  // that loads a whole K tile of a gradient row (up to 32 bf16 past column V-1, see
  // rows_block) stays in that row's zeroed half when V >= 32; past the last row of a
  // smaller V it finds these zeros, not memory the op never wrote.
  constexpr int64_t kSlack = 64;
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  at::Tensor mem = scratch_empty({rows * vocab + kSlack}, f32, debug);
  mem.narrow(0, rows * vocab, kSlack).zero_();
  const at::Tensor buf = mem.narrow(0, 0, rows * vocab).view({rows, vocab});
  // dW accumulates in the GEMM's output (fp32 inside the GEMM, rounded to the weight's
  // dtype between chunks). For bf16 with many chunks that rounding would add up, so
  // beyond kMaxBf16Chunks the sum is kept in an fp32 buffer instead.
  constexpr int64_t kMaxBf16Chunks = 4;
  at::Tensor dw_acc;
  if (need_dw && bf16 && n_chunks > kMaxBf16Chunks) dw_acc = scratch_empty({vocab, d}, f32, debug);
  for (int64_t s = 0; s < n; s += rows) {
    const int64_t c = std::min(rows, n - s);
    const at::Tensor h = hidden.narrow(0, s, c);
    at::Tensor z = buf.narrow(0, 0, c);
    logits_of(h, z);
    // bf16 gradients go over the first half of each fp32 logits row: [c, V] bf16 with
    // row stride 2V, which the bf16 GEMMs below read as a strided matrix (the rest of
    // each row is zeroed by rows_block).
    const at::Tensor g = bf16 ? z.view(at::kBFloat16).narrow(1, 0, vocab) : z;
    const RowArgs args{targets.data_ptr<int64_t>() + s, coef.data_ptr<float>() + s,
                       ignore_index, key, row_offset + s, static_cast<float>(cap),
                       loss.data_ptr<float>() + s, lse.data_ptr<float>() + s, debug};
    rows_block(isa, z.data_ptr(), false, need_grad ? g.data_ptr() : nullptr, bf16, g.stride(0),
               c, vocab, args);
    if (need_dh) {  // dh = g @ W: K runs along g's rows (up to its row stride)
      at::Tensor out = dh_opt->narrow(0, s, c);
      const auto [a, b] = widen_k(g, weight, g.stride(0), debug);
      at::mm_out(out, a, b);
    }
    if (need_dw) {  // dW = g^T @ h: K runs down g's rows (up to the buffer's last row)
      at::Tensor dw = *dw_opt;
      const auto [a, b] = widen_k(g.t(), h, rows, debug);
      if (s == 0 || dw_acc.defined()) {
        at::mm_out(dw, a, b);  // overwrites: dw may hold anything on entry
      } else {
        dw.addmm_(a, b);
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
// distribution. Ignored rows get NaN and false; a row with a NaN or an infinite max gets
// nll = logsumexp - z[t] as torch computes it, NaN moments and false. All outputs are
// [N] and fully written.
void token_stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                 int64_t ignore_index, int64_t key, int64_t row_offset, int64_t chunk,
                 const at::Tensor& nll, const at::Tensor& correct, const at::Tensor& mean,
                 const at::Tensor& var) {
  check_float(hidden, "hidden");
  check_float(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "hidden and weight dtypes differ");
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
  check_targets(targets, ignore_index, key, vocab);
  if (n == 0) return;
  const Isa isa = active_isa();
  const bool debug = debug_mode();
  const LogitsGemm logits_of(weight, isa, debug);
  const int64_t rows = std::min(chunk, n);
  at::Tensor buf = scratch_empty({rows, vocab}, hidden.options().dtype(at::kFloat), debug);
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* nllp = nll.data_ptr<float>();
  bool* okp = correct.data_ptr<bool>();
  float* mup = mean.data_ptr<float>();
  float* varp = var.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t s0 = 0; s0 < n; s0 += rows) {
    const int64_t c = std::min(rows, n - s0);
    at::Tensor z = buf.narrow(0, 0, c);
    logits_of(hidden.narrow(0, s0, c), z);
    const float* zp = z.data_ptr<float>();
    at::parallel_for(0, c, 4, [&](int64_t b, int64_t e) {
      std::vector<float> ex(vocab, debug ? std::numeric_limits<float>::quiet_NaN() : 0.0f);
      for (int64_t r = b; r < e; ++r) {
        const int64_t g = s0 + r;
        const int64_t label = resolve_label(tp[g], ignore_index, key, row_offset + g, vocab);
        if (label < 0) {
          nllp[g] = mup[g] = varp[g] = nan;
          okp[g] = false;
          continue;
        }
        const float* zr = zp + r * vocab;
        float m = 0.0f, sum = 0.0f;
        if (!max_expsum(isa, zr, ex.data(), vocab, &m, &sum)) {
          nllp[g] = lse_nonfinite(zr, vocab) - zr[label];
          mup[g] = varp[g] = nan;
          okp[g] = false;
          continue;
        }
        // With d = z - max: mu = E[d] - log(sum), var = E[d^2] - E[d]^2 (double sums:
        // the difference cancels when the distribution is peaked).
        double a = 0.0, q = 0.0;
#pragma omp simd reduction(+ : a, q)
        for (int64_t v = 0; v < vocab; ++v) {
          const double dv = static_cast<double>(zr[v]) - m;
          a += ex[v] * dv;
          q += ex[v] * dv * dv;
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

// The instruction-set path the kernels take now: "portable", "avx512" or "avx512_bf16".
std::string isa() { return kIsaNames[static_cast<int>(active_isa())]; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "noencore C++ CPU kernels: fused cross-entropy with ascent";
  m.def("ce_fwd", &ce_fwd,
        "per-row CE loss, logsumexp and gradient (optionally in place) on logits [N, V]");
  m.def("linear_ce_fwd", &linear_ce_fwd,
        "fused linear head + CE: loss, logsumexp, dh, dW into given outputs");
  m.def("random_labels", &random_labels, "random labels of a row range");
  m.def("token_stats", &token_stats, "per-row nll, top-1, log-prob mean and variance");
  m.def("isa", &isa, "instruction-set path of the kernels: portable, avx512 or avx512_bf16");
}
