// Fused KD + CE loss on CPU: the math of spacedkd_fast/loss/reference.py, one row at a time.
//
// OpenMP splits the rows across threads. Each thread converts its row into float32 scratch buffers (a row of 1000
// logits is 4 KB: it stays in L1 while the row is read three times), computes the statistics with one exact max,
// then writes the loss and the gradients. The inner loops are branch-free over contiguous floats so the compiler
// vectorizes them; they are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kd_loss.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPACEDKD_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPACEDKD_HOT
#endif

namespace spacedkd {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Eight floats: GCC/Clang vector extensions compile these to one AVX2 register (or two SSE ones in the baseline
// clone), so the hot loops are vectorized by construction, not by the auto-vectorizer's judgement.
using f8 = float __attribute__((vector_size(32)));
using i8 = int32_t __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

#define SPACEDKD_INLINE inline __attribute__((always_inline))

SPACEDKD_INLINE f8 splat(float v) { return f8{} + v; }
SPACEDKD_INLINE f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SPACEDKD_INLINE void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
SPACEDKD_INLINE double hsum(f8 v) {
  double total = 0.0;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// exp(x) for x <= 0 (or NaN or -inf). Cephes expf: x = n·ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial (about 1 ulp), 2^n assembled in the exponent bits. Results below FLT_MIN are flushed to 0: a softmax
// never keeps a term 1e-38 times smaller than its largest one. NaN stays NaN (every comparison with it is false).
SPACEDKD_INLINE f8 exp_nonpos(f8 x) {
  const f8 lo = splat(-87.33654f);  // ln(FLT_MIN)
  const i8 below = x < lo;
  const f8 xc = below ? lo : x;
  f8 fn = xc * 1.44269504088896341f;
  fn = (fn + 12582912.0f) - 12582912.0f;  // round to nearest with the 1.5·2^23 trick (no -ffast-math here)
  f8 r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const f8 fn_safe = fn == fn ? fn : splat(0.0f);  // NaN: keep the conversion defined; p carries the NaN
  const i8 bits = __builtin_convertvector(fn_safe + 127.0f, i8) << 23;
  return below ? splat(0.0f) : p * __builtin_bit_cast(f8, bits);
}

template <typename T>
void load_row(const T* src, int64_t stride, int64_t n, float* __restrict dst) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
  }
}

template <typename T>
void store_row(const float* __restrict src, int64_t n, T* __restrict dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// The row loops below run over n8 = V rounded up to 8; the scratch rows are padded with -inf (logits) and 0
// (exponentials), values that contribute nothing to any max or sum.
SPACEDKD_HOT float row_max(const float* __restrict x, int64_t n8) {
  f8 m = splat(kNegInf);
  for (int64_t j = 0; j < n8; j += kLanes) {
    const f8 v = load8(x + j);
    m = v > m ? v : m;
  }
  float out = kNegInf;
  for (int i = 0; i < kLanes; ++i) out = m[i] > out ? m[i] : out;
  return out;
}

// Sums run over chunks: vector partial sums inside a chunk, chunk totals added in double. That keeps the error of
// a 128k-term sum at float32 level for one double add per chunk.
constexpr int64_t kChunk = 512;

// e[j] = exp((x[j] - ref) * scale); returns Σ e.
SPACEDKD_HOT float exp_shifted(const float* __restrict x, int64_t n8, float ref, float scale, float* __restrict e) {
  double total = 0.0;
  for (int64_t c = 0; c < n8; c += kChunk) {
    const int64_t end = c + kChunk < n8 ? c + kChunk : n8;
    f8 z = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) {
      const f8 v = exp_nonpos((load8(x + j) - ref) * scale);
      store8(e + j, v);
      z += v;
    }
    total += hsum(z);
  }
  return static_cast<float>(total);
}

// Σ x[j] over exactly n elements (no padding assumed).
SPACEDKD_HOT float row_sum(const float* __restrict x, int64_t n) {
  double total = 0.0;
  const int64_t n_full = n - n % kLanes;
  for (int64_t c = 0; c < n_full; c += kChunk) {
    const int64_t end = c + kChunk < n_full ? c + kChunk : n_full;
    f8 z = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) z += load8(x + j);
    total += hsum(z);
  }
  for (int64_t j = n_full; j < n; ++j) total += x[j];
  return static_cast<float>(total);
}

struct StudentStats {
  float z1;  // Σ exp(s − ref_s)
  float zT;  // Σ exp((s − ref_s)/T)
  float a;   // Σ exp((t − ref_t)/T) · ((t − ref_t) − (s − ref_s)), the KL numerator
};

// One pass over a student row once its max is known: the exponentials at T = 1 and at T (stored for the
// gradient) and the KL numerator against the teacher's exponentials `et`. A zero teacher weight contributes 0 to
// the numerator even where d is ±inf or NaN (padding, masked vocabulary).
SPACEDKD_HOT StudentStats student_stats(const float* __restrict s, const float* __restrict t,
                                        const float* __restrict et, int64_t n8, float ref_s, float ref_t,
                                        float inv_temp, bool with_kd, bool temp_is_one, float* __restrict e1,
                                        float* __restrict eT) {
  double z1 = 0.0, zT = 0.0, a = 0.0;
  for (int64_t c = 0; c < n8; c += kChunk) {
    const int64_t end = c + kChunk < n8 ? c + kChunk : n8;
    f8 z1v = splat(0.0f), zTv = splat(0.0f), av = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) {
      const f8 xs = load8(s + j) - ref_s;
      const f8 v1 = exp_nonpos(xs);
      store8(e1 + j, v1);
      z1v += v1;
      if (with_kd) {
        if (!temp_is_one) {
          const f8 vT = exp_nonpos(xs * inv_temp);
          store8(eT + j, vT);
          zTv += vT;
        }
        const f8 w = load8(et + j);
        const f8 term = w * ((load8(t + j) - ref_t) - xs);
        av += w == 0.0f ? splat(0.0f) : term;
      }
    }
    z1 += hsum(z1v);
    zT += hsum(zTv);
    a += hsum(av);
  }
  return {static_cast<float>(z1), static_cast<float>(temp_is_one ? z1 : zT), static_cast<float>(a)};
}

// g = ce_coef·(e1/z1 − ε/V) + kd_coef·(eT/zT − et/zt); a term whose coefficient is 0 is skipped.
SPACEDKD_HOT void student_grad(const float* __restrict e1, const float* __restrict eT, const float* __restrict et,
                               int64_t n8, float ce_coef, float inv_z1, float smooth, float kd_coef, float inv_zT,
                               float inv_zt, bool has_ce, bool has_kd, float* __restrict g) {
  for (int64_t j = 0; j < n8; j += kLanes) {
    f8 v = splat(0.0f);
    if (has_ce) v += ce_coef * (load8(e1 + j) * inv_z1 - smooth);
    if (has_kd) v += kd_coef * (load8(eT + j) * inv_zT - load8(et + j) * inv_zt);
    store8(g + j, v);
  }
}

// gt = coef · p_t · (d − A/zt), p_t = et/zt; 0 where p_t is 0.
SPACEDKD_HOT void teacher_grad(const float* __restrict s, const float* __restrict t, const float* __restrict et,
                               int64_t n8, float ref_s, float ref_t, float inv_zt, float a_over_zt, float coef,
                               float* __restrict g) {
  for (int64_t j = 0; j < n8; j += kLanes) {
    const f8 p = load8(et + j) * inv_zt;
    const f8 d = (load8(t + j) - ref_t) - (load8(s + j) - ref_s);
    const f8 term = coef * p * (d - a_over_zt);
    store8(g + j, p == 0.0f ? splat(0.0f) : term);
  }
}

// Per-thread rows, padded to a multiple of 8 lanes: logits with -inf, everything else with 0.
struct Scratch {
  explicit Scratch(int64_t v)
      : n8((v + kLanes - 1) / kLanes * kLanes), t(n8, kNegInf), et(n8, 0.f), s(n8, kNegInf), e1(n8, 0.f),
        eT(n8, 0.f), g(n8, 0.f) {}
  int64_t n8;
  std::vector<float> t, et, s, e1, eT, g;
};

template <typename S, typename T>
void run(const at::Tensor& student, const at::Tensor& teacher, const int64_t* target, const KDLossParams& p,
         at::Tensor& loss, at::Tensor& grad_s, at::Tensor& grad_t) {
  const int64_t K = student.size(0), R1 = student.size(2), V = student.size(3);
  const int64_t N = student.size(1) * R1;
  const S* s_base = student.data_ptr<S>();
  const T* t_base = teacher.data_ptr<T>();
  const int64_t s_sk = student.stride(0), s_s0 = student.stride(1), s_s1 = student.stride(2),
                s_sv = student.stride(3);
  const int64_t t_s0 = teacher.stride(0), t_s1 = teacher.stride(1), t_sv = teacher.stride(2);
  float* loss_ptr = loss.data_ptr<float>();
  S* gs_ptr = grad_s.defined() ? grad_s.data_ptr<S>() : nullptr;
  T* gt_ptr = grad_t.defined() ? grad_t.data_ptr<T>() : nullptr;

  const bool has_ce = target != nullptr && p.ce_weight != 0.0f;
  const bool has_kd = p.kd_weight != 0.0f;
  const bool temp_is_one = p.inv_temperature == 1.0f;
  const float smooth = p.label_smoothing / static_cast<float>(V);
  const float ce_coef = p.ce_weight * p.grad_scale;
  const float kd_coef = p.kd_weight * p.inv_temperature * p.grad_scale;
  const float kd_t_coef = kd_coef * p.inv_temperature;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    Scratch buf(V);
    const int64_t n8 = buf.n8;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t y = target != nullptr ? target[n] : 0;
      const bool valid = target == nullptr || y != p.ignore_index;
      const bool bad_label = valid && target != nullptr && (y < 0 || y >= V);
      const int64_t r0 = n / R1, r1 = n % R1;

      float ref_t = 0.0f, zt = 0.0f;
      if (valid && has_kd) {
        load_row(t_base + r0 * t_s0 + r1 * t_s1, t_sv, V, buf.t.data());
        const float m_t = row_max(buf.t.data(), n8);
        ref_t = m_t == kNegInf ? 0.0f : m_t;
        zt = exp_shifted(buf.t.data(), n8, ref_t, p.inv_temperature, buf.et.data());
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t out_row = k * N + n;
        if (!valid) {
          loss_ptr[out_row] = 0.0f;
          if (gs_ptr) std::memset(static_cast<void*>(gs_ptr + out_row * V), 0, V * sizeof(S));
          if (gt_ptr) std::memset(static_cast<void*>(gt_ptr + out_row * V), 0, V * sizeof(T));
          continue;
        }
        float* s = buf.s.data();
        load_row(s_base + k * s_sk + r0 * s_s0 + r1 * s_s1, s_sv, V, s);
        const float m_s = row_max(s, n8);
        const float ref_s = m_s == kNegInf ? 0.0f : m_s;
        const StudentStats st = student_stats(s, buf.t.data(), buf.et.data(), n8, ref_s, ref_t, p.inv_temperature,
                                              has_kd, temp_is_one, buf.e1.data(), buf.eT.data());
        const float z1 = st.z1, zT = st.zT, a = st.a;
        const float* eT = temp_is_one ? buf.e1.data() : buf.eT.data();

        float row_loss = 0.0f;
        const float log_z1 = std::log(z1);
        if (has_ce) {
          const float s_y = bad_label ? 0.0f : s[y];
          const float mean_s = p.label_smoothing != 0.0f ? row_sum(s, V) / static_cast<float>(V) : 0.0f;
          const float ce = (1.0f - p.label_smoothing) * (ref_s - s_y + log_z1) +
                           p.label_smoothing * (ref_s - mean_s + log_z1);
          row_loss += p.ce_weight * ce;
        }
        if (has_kd) {
          const float kl = a / zt * p.inv_temperature + std::log(zT) - std::log(zt);
          row_loss += p.kd_weight * kl;
        }
        loss_ptr[out_row] = bad_label ? kNaN : row_loss;

        if (gs_ptr) {
          float* g = buf.g.data();
          student_grad(buf.e1.data(), eT, buf.et.data(), n8, ce_coef, 1.0f / z1, smooth, kd_coef, 1.0f / zT,
                       1.0f / zt, has_ce, has_kd, g);
          if (has_ce && !bad_label) g[y] -= ce_coef * (1.0f - p.label_smoothing);
          if (bad_label) std::fill(g, g + V, kNaN);
          store_row(g, V, gs_ptr + out_row * V);
        }
        if (gt_ptr) {
          float* g = buf.g.data();
          if (has_kd) {
            teacher_grad(s, buf.t.data(), buf.et.data(), n8, ref_s, ref_t, 1.0f / zt, a / zt, kd_t_coef, g);
          } else {
            std::fill(g, g + V, 0.0f);
          }
          if (bad_label) std::fill(g, g + V, kNaN);
          store_row(g, V, gt_ptr + out_row * V);
        }
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const c10::optional<at::Tensor>& target,
                                                                   const KDLossParams& params, bool grad_student,
                                                                   bool grad_teacher) {
  const int64_t K = student.size(0), N = student.size(1) * student.size(2), V = student.size(3);
  at::Tensor loss = at::empty({K, N}, student.options().dtype(at::kFloat));
  at::Tensor grad_s = grad_student ? at::empty({K, N, V}, student.options()) : at::Tensor();
  at::Tensor grad_t = grad_teacher ? at::empty({K, N, V}, teacher.options()) : at::Tensor();
  const int64_t* y = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  if (N == 0 || K == 0) return {loss, grad_s, grad_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_cpu_student", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "kd_loss_cpu_teacher", [&] {
      run<S, scalar_t>(student, teacher, y, params, loss, grad_s, grad_t);
    });
  });
  return {loss, grad_s, grad_t};
}

}  // namespace spacedkd
