// Fused KD + CE loss on CPU: the math of spacedkd_fast/loss/reference.py, one row at a time.
//
// OpenMP splits the rows across threads. Each thread converts its row into float32 scratch buffers (a row of 1000
// logits is 4 KB: it stays in L1 while the row is read three times), computes the statistics with one exact max,
// then writes the loss and the gradients. The inner loops are branch-free over contiguous floats so the compiler
// vectorizes them; they are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <c10/core/impl/alloc_cpu.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <unistd.h>
#include <xmmintrin.h>
#include <type_traits>
#include <sstream>
#include <unordered_map>
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
constexpr int64_t kParallelElements = 1 << 15;

// Eight floats: GCC/Clang vector extensions compile these to one AVX2 register (or two SSE ones in the baseline
// clone), so the hot loops are vectorized by construction, not by the auto-vectorizer's judgement.
using f8 = float __attribute__((vector_size(32)));
using i8 = int32_t __attribute__((vector_size(32)));
using u8 = uint32_t __attribute__((vector_size(32)));
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

// 2^u for u <= 0 (or NaN or -inf); callers pass u = x·log2(e)·scale (the log2(e) folds into their multiply).
// u = n + f with |f| <= 1/2: 2^f by a degree-5 minimax polynomial (relative error 1.9e-7 in float32, under 2 ulp),
// 2^n written into the exponent bits. Adding 1.5·2^23 rounds u to the integer n and leaves n in the low mantissa
// bits, so no float→int conversion is needed. Results below FLT_MIN are flushed to 0 (a softmax never keeps a term
// 1e-38 times smaller than its largest one), which also covers -inf; NaN stays NaN (it fails every comparison and
// poisons the polynomial).
SPACEDKD_INLINE f8 exp2_nonpos(f8 u) {
  constexpr float kRound = 12582912.0f;  // 1.5·2^23, bit pattern 0x4B400000
  const i8 below = u < -126.0f;          // log2(FLT_MIN)
  const f8 shifted = u + kRound;
  const f8 f = u - (shifted - kRound);
  f8 p = splat(1.3264701701700687e-3f);
  p = p * f + 9.671504609286785e-3f;
  p = p * f + 5.550733581185341e-2f;
  p = p * f + 2.4022242426872253e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.0f;
  const u8 exponent = (__builtin_bit_cast(u8, shifted) + (127u - 0x4B400000u)) << 23;  // n + 127, wrapping
  return below ? splat(0.0f) : p * __builtin_bit_cast(f8, exponent);
}

constexpr float kLog2e = 1.44269504088896341f;

// Copy a row into float32 scratch (padded to n8 with -inf by the caller) and return its max, in one pass.
template <typename T>
SPACEDKD_HOT float load_row_max(const T* src, int64_t stride, int64_t n, int64_t n8, float* __restrict dst) {
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, src, n * sizeof(float));
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
  }
  f8 m = splat(kNegInf);
  for (int64_t j = 0; j < n8; j += kLanes) {
    const f8 v = load8(dst + j);
    m = v > m ? v : m;
  }
  float out = kNegInf;
  for (int i = 0; i < kLanes; ++i) out = m[i] > out ? m[i] : out;
  return out;
}

// Size of the last-level cache (32 MiB when the system does not say).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return l3 > 0 ? static_cast<int64_t>(l3) : int64_t(32) << 20;
  }();
  return bytes;
}

// Ask for a contiguous row (a strided one is left to the hardware) ahead of its use.
template <typename T>
SPACEDKD_INLINE void prefetch_row(const T* row, int64_t stride, int64_t n) {
  if (stride != 1) return;
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

template <typename T>
void store_row(const float* __restrict src, int64_t n, T* __restrict dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

// The row loops below run over n8 = V rounded up to 8; the scratch rows are padded with -inf (logits) and 0
// (exponentials), values that contribute nothing to any max or sum.

// Sums run over chunks: vector partial sums inside a chunk, chunk totals added in double. That keeps the error of
// a 128k-term sum at float32 level for one double add per chunk.
constexpr int64_t kChunk = 512;

// e[j] = exp((x[j] - ref) * scale); returns Σ e.
SPACEDKD_HOT float exp_shifted(const float* __restrict x, int64_t n8, float ref, float scale, float* __restrict e) {
  scale *= kLog2e;
  double total = 0.0;
  for (int64_t c = 0; c < n8; c += kChunk) {
    const int64_t end = c + kChunk < n8 ? c + kChunk : n8;
    f8 z = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) {
      const f8 v = exp2_nonpos((load8(x + j) - ref) * scale);
      store8(e + j, v);
      z += v;
    }
    total += hsum(z);
  }
  return static_cast<float>(total);
}

struct MaskedSum {
  float sum;    // Σ x[j] over the unmasked entries (x[j] != -inf)
  float count;  // how many there are
};

// The sum and the count of the entries that are not -inf (masked tokens; the -inf padding up to n8 included).
// NaN and +inf are counted, so they propagate.
SPACEDKD_HOT MaskedSum masked_row_sum(const float* __restrict x, int64_t n8) {
  double total = 0.0, count = 0.0;
  for (int64_t c = 0; c < n8; c += kChunk) {
    const int64_t end = c + kChunk < n8 ? c + kChunk : n8;
    f8 z = splat(0.0f), k = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) {
      const f8 v = load8(x + j);
      const i8 kept = v != kNegInf;
      z += kept ? v : splat(0.0f);
      k += kept ? splat(1.0f) : splat(0.0f);
    }
    total += hsum(z);
    count += hsum(k);
  }
  return {static_cast<float>(total), static_cast<float>(count)};
}

struct StudentStats {
  float z1;  // Σ exp(s − ref_s)
  float zT;  // Σ exp((s − ref_s)/T)
  float a;   // Σ exp((t − ref_t)/T) · ((t − ref_t) − (s − ref_s)), the KL numerator
};

// e^(x·k) from e^x = v for an integer k >= 2 (k − 1 multiplies instead of an exponential); terms below FLT_MIN
// are 0, as exp2_nonpos gives them (and no denormal ever enters a multiply). `u1` is x·log2(e).
SPACEDKD_INLINE f8 integer_power(f8 v, f8 u1, int k) {
  f8 p = v;
  for (int i = 1; i < k; ++i) p *= v;
  return u1 < -126.0f ? splat(0.0f) : p;
}

// One pass over a student row once its max is known: the exponentials at T = 1 and at T (stored for the
// gradient) and the KL numerator against the teacher's exponentials `et`. A zero teacher weight contributes 0 to
// the numerator even where d is ±inf or NaN (padding, masked vocabulary). For an integer temperature T = k (2 to 8:
// the usual KD temperatures), exp(x) = exp(x/T)^k: one exponential per element instead of two, within 2k ulp.
SPACEDKD_HOT StudentStats student_stats(const float* __restrict s, const float* __restrict t,
                                        const float* __restrict et, int64_t n8, float ref_s, float ref_t,
                                        float inv_temp, int integer_temp, bool with_kd, bool temp_is_one,
                                        float* __restrict e1, float* __restrict eT) {
  double z1 = 0.0, zT = 0.0, a = 0.0;
  const float scale_T = inv_temp * kLog2e;
  const bool power = with_kd && !temp_is_one && integer_temp >= 2;
  for (int64_t c = 0; c < n8; c += kChunk) {
    const int64_t end = c + kChunk < n8 ? c + kChunk : n8;
    f8 z1v = splat(0.0f), zTv = splat(0.0f), av = splat(0.0f);
    for (int64_t j = c; j < end; j += kLanes) {
      const f8 xs = load8(s + j) - ref_s;
      const f8 u1 = xs * kLog2e;
      f8 vT = splat(0.0f);
      if (with_kd && !temp_is_one) {
        vT = exp2_nonpos(xs * scale_T);
        store8(eT + j, vT);
        zTv += vT;
      }
      const f8 v1 = power ? integer_power(vT, u1, integer_temp) : exp2_nonpos(u1);
      store8(e1 + j, v1);
      z1v += v1;
      if (with_kd) {
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

// g = ce_coef·(e1/z1 − smooth·[s ≠ −inf]) − hit·onehot(label) + kd_coef·(eT/zT − et/zt); a term whose coefficient
// is 0 is skipped, label < 0 means none. `smooth` = ε/|U| goes to the unmasked tokens U only: `masked_s` is the
// student row to test for −inf, or null when the row has no masked token (then every token gets it, no test).
// Writes exactly n values (the inputs are padded to a multiple of 8, g need not be), so g may be the output row.
// `stream`: write around the caches (non-temporal stores), for outputs too large to be cached still when read.
SPACEDKD_HOT void student_grad(const float* __restrict e1, const float* __restrict eT, const float* __restrict et,
                               const float* __restrict masked_s, int64_t n, float ce_coef, float inv_z1,
                               float smooth, float kd_coef, float inv_zT, float inv_zt, bool has_ce, bool has_kd,
                               int64_t label, float hit, bool stream, float* __restrict g) {
  stream = stream && reinterpret_cast<uintptr_t>(g) % 16 == 0;
  for (int64_t j = 0; j < n; j += kLanes) {
    f8 v = splat(0.0f);
    if (has_ce) {
      f8 sm = splat(smooth);
      if (masked_s != nullptr) sm = load8(masked_s + j) != kNegInf ? sm : splat(0.0f);
      v += ce_coef * (load8(e1 + j) * inv_z1 - sm);
    }
    if (has_kd) v += kd_coef * (load8(eT + j) * inv_zT - load8(et + j) * inv_zt);
    if (label >= j && label < j + kLanes) v[label - j] -= hit;
    if (j + kLanes <= n) {
      if (stream) {
        __m128 lo, hi;
        std::memcpy(&lo, &v, 16);
        std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 16, 16);
        _mm_stream_ps(g + j, lo);
        _mm_stream_ps(g + j + 4, hi);
      } else {
        store8(g + j, v);
      }
    } else {
      std::memcpy(g + j, &v, (n - j) * sizeof(float));
    }
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
  // T = 2..8 exactly (1/T as the Python side computes it): exp(x) as exp(x/T)^T in student_stats.
  const float temperature = 1.0f / p.inv_temperature;
  const int integer_temp = (temperature == std::round(temperature) && temperature >= 2.0f && temperature <= 8.0f &&
                            1.0f / static_cast<float>(static_cast<int>(temperature)) == p.inv_temperature)
                               ? static_cast<int>(temperature)
                               : 0;
  const float ce_coef = p.ce_weight * p.grad_scale;
  const float kd_coef = p.kd_weight * p.inv_temperature * p.grad_scale;
  const float kd_t_coef = kd_coef * p.inv_temperature;

  // When the op touches more bytes than the last-level cache holds, the gradient is evicted before its reader
  // (the next backward op) gets to it: write it around the caches, which also saves reading each line first.
  const int64_t touched = K * N * V * static_cast<int64_t>(2 * sizeof(S)) + N * V * static_cast<int64_t>(sizeof(T));
  const bool stream_grad = touched > last_level_cache_bytes();
  // Below ~32K elements the OpenMP fork/join costs more than the rows (the paper's 128 × 100 is 12.8K).
  const bool parallel = K * N * V >= kParallelElements && at::get_num_threads() > 1;
#pragma omp parallel num_threads(at::get_num_threads()) if (parallel)
  {
    Scratch buf(V);
    const int64_t n8 = buf.n8;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t y = target != nullptr ? target[n] : 0;
      const bool valid = target == nullptr || y != p.ignore_index;
      const int64_t r0 = n / R1, r1 = n % R1;
      if (n + 1 < N) {  // start the next row's reads from memory while this one is computed from cache
        const int64_t q0 = (n + 1) / R1, q1 = (n + 1) % R1;
        if (has_kd) prefetch_row(t_base + q0 * t_s0 + q1 * t_s1, t_sv, V);
        for (int64_t k = 0; k < K; ++k) prefetch_row(s_base + k * s_sk + q0 * s_s0 + q1 * s_s1, s_sv, V);
      }

      float ref_t = 0.0f, zt = 0.0f;
      if (valid && has_kd) {
        const float m_t = load_row_max(t_base + r0 * t_s0 + r1 * t_s1, t_sv, V, n8, buf.t.data());
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
        const float m_s = load_row_max(s_base + k * s_sk + r0 * s_s0 + r1 * s_s1, s_sv, V, n8, s);
        const float ref_s = m_s == kNegInf ? 0.0f : m_s;
        const StudentStats st = student_stats(s, buf.t.data(), buf.et.data(), n8, ref_s, ref_t, p.inv_temperature,
                                              integer_temp,
                                              has_kd, temp_is_one, buf.e1.data(), buf.eT.data());
        const float z1 = st.z1, zT = st.zT, a = st.a;
        const float* eT = temp_is_one ? buf.e1.data() : buf.eT.data();

        float row_loss = 0.0f;
        const float log_z1 = std::log(z1);
        // Label smoothing spreads ε over the unmasked tokens U (student logit > −inf): ε/|U| each, and the CE
        // term uses the mean of s over U. |U| = V (no test in the gradient) unless the row masks a token.
        float smooth_row = 0.0f;
        const float* masked_s = nullptr;
        if (has_ce) {
          const float s_y = s[y];  // labels were checked: 0 <= y < V
          float mean_s = 0.0f;
          if (p.label_smoothing != 0.0f) {
            const MaskedSum unmasked = masked_row_sum(s, n8);
            mean_s = unmasked.sum / unmasked.count;
            smooth_row = p.label_smoothing / unmasked.count;
            if (unmasked.count != static_cast<float>(V)) masked_s = s;
          }
          const float ce = (1.0f - p.label_smoothing) * (ref_s - s_y + log_z1) +
                           p.label_smoothing * (ref_s - mean_s + log_z1);
          row_loss += p.ce_weight * ce;
        }
        if (has_kd) {
          const float kl = a / zt * p.inv_temperature + std::log(zT) - std::log(zt);
          row_loss += p.kd_weight * kl;
        }
        loss_ptr[out_row] = row_loss;

        if (gs_ptr) {
          // A float32 gradient is written in place; other dtypes go through the scratch row and convert.
          float* g = std::is_same_v<S, float> ? reinterpret_cast<float*>(gs_ptr + out_row * V) : buf.g.data();
          student_grad(buf.e1.data(), eT, buf.et.data(), masked_s, V, ce_coef, 1.0f / z1, smooth_row, kd_coef,
                       1.0f / zT, 1.0f / zt, has_ce, has_kd, has_ce ? y : -1, ce_coef * (1.0f - p.label_smoothing),
                       stream_grad && std::is_same_v<S, float>, g);
          if constexpr (!std::is_same_v<S, float>) store_row(g, V, gs_ptr + out_row * V);
        }
        if (gt_ptr) {
          float* g = buf.g.data();
          if (has_kd) {
            teacher_grad(s, buf.t.data(), buf.et.data(), n8, ref_s, ref_t, 1.0f / zt, a / zt, kd_t_coef, g);
          } else {
            std::fill(g, g + V, 0.0f);
          }
          store_row(g, V, gt_ptr + out_row * V);
        }
      }
    }
    if (stream_grad) _mm_sfence();  // the streamed rows are visible to every thread after the region's barrier
  }
}

// ---- gradient buffers -----------------------------------------------------------------------------------------
// A fresh multi-megabyte gradient every step costs one page fault per 4 KB the first time it is written (at
// 4096 × 1000 that is a third of the whole step). Large gradient buffers therefore come from a small pool: a buffer
// whose tensor is freed goes back to the pool (already mapped) and the next call of the same size reuses it.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may be freed during interpreter exit
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kMinBytes) return at::empty(sizes, options);
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return at::from_blob(data, sizes, [bytes](void* p) { BufferPool::get().give(p, bytes); }, options);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : free_) c10::free_cpu(entry.second);
    free_.clear();
    cached_ = 0;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  static constexpr size_t kMinBytes = size_t(128) << 10;  // smaller ones come from malloc's heap, no faults
  static constexpr size_t kMaxCached = size_t(1) << 30;  // bytes kept for reuse, at most

 private:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return data;
  }

  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kMaxCached) {
        free_.emplace(bytes, data);
        cached_ += bytes;
        return;
      }
    }
    c10::free_cpu(data);
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// Count the non-ignored labels; raise a ValueError naming up to five labels outside [0, V).
int64_t check_and_count_labels(const int64_t* y, int64_t n, int64_t vocab, int64_t ignore_index) {
  int64_t valid = 0, bad = 0;
  int64_t first_bad[5];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = y[i];
    if (label == ignore_index) continue;
    ++valid;
    if (label < 0 || label >= vocab) {
      if (bad < 5) first_bad[bad] = label;
      ++bad;
    }
  }
  if (bad > 0) {
    std::ostringstream values;
    values << "[";
    for (int64_t i = 0; i < std::min<int64_t>(bad, 5); ++i) values << (i ? ", " : "") << first_bad[i];
    values << "]" << (bad > 5 ? " ..." : "");
    TORCH_CHECK_VALUE(false, "kd_loss: target holds labels outside [0, ", vocab, ") that are not ignore_index=",
                      ignore_index, ": ", values.str());
  }
  return valid;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const c10::optional<at::Tensor>& target,
                                                                   KDLossParams params, Reduction reduction,
                                                                   bool grad_student, bool grad_teacher) {
  const int64_t K = student.size(0), N = student.size(1) * student.size(2), V = student.size(3);
  const int64_t* y = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  const int64_t count = y != nullptr ? check_and_count_labels(y, N, V, params.ignore_index) : N;
  params.grad_scale = reduction == Reduction::kMean ? 1.0f / static_cast<float>(std::max<int64_t>(count, 1)) : 1.0f;

  at::Tensor rows = at::empty({K, N}, student.options().dtype(at::kFloat));
  BufferPool& pool = BufferPool::get();
  at::Tensor grad_s = grad_student ? pool.empty({K, N, V}, student.options()) : at::Tensor();
  at::Tensor grad_t = grad_teacher ? pool.empty({K, N, V}, teacher.options()) : at::Tensor();
  if (N > 0 && K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_cpu_student", [&] {
      using S = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "kd_loss_cpu_teacher", [&] {
        run<S, scalar_t>(student, teacher, y, params, rows, grad_s, grad_t);
      });
    });
  }
  if (reduction == Reduction::kNone) return {rows, grad_s, grad_t};

  // Row losses summed in double, then the mean's division: the reduced (K,) loss, no further torch op.
  at::Tensor loss = at::empty({K}, rows.options());
  const float* r = rows.data_ptr<float>();
  float* out = loss.data_ptr<float>();
  const double divisor = reduction == Reduction::kMean ? static_cast<double>(std::max<int64_t>(count, 1)) : 1.0;
  for (int64_t k = 0; k < K; ++k) {
    double total = 0.0;
    for (int64_t n = 0; n < N; ++n) total += r[k * N + n];
    out[k] = static_cast<float>(total / divisor);
  }
  return {loss, grad_s, grad_t};
}

void release_cached_buffers() { BufferPool::get().clear(); }

size_t cached_buffer_bytes() { return BufferPool::get().cached_bytes(); }

}  // namespace spacedkd
