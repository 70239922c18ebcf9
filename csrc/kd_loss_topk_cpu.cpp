// Fused KD + CE loss against a sparse (top-k) teacher on CPU: the math of spacedkd_fast/loss/sparse.py, one row at
// a time.
//
// Each row reads the k teacher entries and the student row once (into float32 scratch, which then stays in cache),
// computes the student's statistics at T = 1 and at T, the teacher's k (+ 1: the "bucket" tail) probabilities, the
// loss, and writes the dense student gradient: the CE part and the student softmax everywhere, corrected at the k
// teacher ids. Rows are split across threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <vector>

#include "kd_loss.h"

namespace spacedkd {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kParallelElements = 1 << 15;

struct RowScratch {
  explicit RowScratch(int64_t v, int64_t k) : x(v), e1(v), eT(v), g(v), u(k + 1), et(k + 1), saved(k) {}
  std::vector<float> x, e1, eT, g;  // student row, its exponentials at 1 and T, its gradient
  std::vector<float> u, et, saved;  // teacher values (+ tail), their exponentials at T, eT at the teacher ids
};

// exp(x) for x <= 0 in float: std::exp, with -inf giving 0.
inline float expf_(float x) { return std::exp(x); }

template <typename S>
void run_topk(const at::Tensor& student, const int64_t* idx, const float* vals, int64_t k, const int64_t* target,
              const KDLossParams& p, bool bucket, float* rows, S* grad) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t s_sn = student.stride(0), s_sv = student.stride(1);
  const S* s_base = student.data_ptr<S>();
  const bool has_ce = target != nullptr && p.ce_weight != 0.0f;
  const bool has_kd = p.kd_weight != 0.0f;
  const bool temp_is_one = p.inv_temperature == 1.0f;
  const bool with_tail = bucket && k < V;
  const float inv_t = p.inv_temperature;
  const float eps = p.label_smoothing;
  const float ce_coef = p.ce_weight * p.grad_scale;
  const float kd_coef = p.kd_weight * inv_t * p.grad_scale;
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    RowScratch buf(V, k);
    float* x = buf.x.data();
    float* e1 = buf.e1.data();
    float* eT = temp_is_one ? buf.e1.data() : buf.eT.data();
    float* g = buf.g.data();
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target != nullptr ? target[n] : 0;
      S* g_out = grad != nullptr ? grad + n * V : nullptr;
      if (target != nullptr && y == p.ignore_index) {
        rows[n] = 0.0f;
        if (g_out != nullptr) std::fill(g_out, g_out + V, static_cast<S>(0.0f));
        continue;
      }
      const S* s_row = s_base + n * s_sn;
      float m = kNegInf;
      for (int64_t j = 0; j < V; ++j) {
        x[j] = static_cast<float>(s_row[j * s_sv]);
        m = x[j] > m ? x[j] : m;
      }
      if (m == kNegInf) m = 0.0f;  // a fully masked row: keep exp() away from -inf - -inf (its loss is NaN)
      double z1d = 0.0, zTd = 0.0, sum_u = 0.0, count_u = 0.0;
      for (int64_t j = 0; j < V; ++j) {
        const float d = x[j] - m;
        e1[j] = expf_(d);
        z1d += e1[j];
        if (!temp_is_one) {
          eT[j] = expf_(d * inv_t);
          zTd += eT[j];
        }
        if (x[j] != kNegInf) {
          sum_u += x[j];
          count_u += 1.0;
        }
      }
      const float z1 = static_cast<float>(z1d);
      const float zT = temp_is_one ? z1 : static_cast<float>(zTd);
      const float log_z1 = std::log(z1);
      float loss = 0.0f;
      if (has_ce) {
        const float ce = (1.0f - eps) * (m - x[y] + log_z1) +
                         (eps != 0.0f ? eps * (m - static_cast<float>(sum_u / count_u) + log_z1) : 0.0f);
        loss += p.ce_weight * ce;
      }

      // Teacher: k values (+ the tail as one outcome), tempered and normalized.
      const int64_t* ids = idx + n * k;
      const float* v = vals + n * k;
      float p_tail = 0.0f, tail_factor = 1.0f;
      float zt = 0.0f, mt = 0.0f;
      if (has_kd) {
        float* u = buf.u.data();
        float* et = buf.et.data();
        for (int64_t j = 0; j < k; ++j) u[j] = v[j];
        int64_t kk = k;
        if (with_tail) {
          // P_tail = 1 − Σ exp(v) at T = 1, as −expm1(lse(v)); 0 when the k entries hold all the mass.
          float mv = kNegInf;
          for (int64_t j = 0; j < k; ++j) mv = v[j] > mv ? v[j] : mv;
          float tail = 0.0f;
          if (mv != kNegInf) {
            double sv = 0.0;
            for (int64_t j = 0; j < k; ++j) sv += std::exp(static_cast<double>(v[j]) - mv);
            const double lse = mv + std::log(sv);
            tail = lse < 0.0 ? static_cast<float>(-std::expm1(lse)) : 0.0f;
          } else {
            tail = 1.0f;  // no top-k mass at all: everything is in the tail
          }
          u[k] = tail > 0.0f ? std::log(tail) : kNegInf;
          kk = k + 1;
        }
        mt = kNegInf;
        for (int64_t j = 0; j < kk; ++j) mt = u[j] > mt ? u[j] : mt;
        if (mt == kNegInf) mt = 0.0f;  // an all −inf teacher row: zt = 0, p = NaN below, as the spec says
        double ztd = 0.0;
        for (int64_t j = 0; j < kk; ++j) {
          et[j] = expf_((u[j] - mt) * inv_t);
          ztd += et[j];
        }
        zt = static_cast<float>(ztd);
        const float log_zt = std::log(zt), log_zT = std::log(zT);
        double kl = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          const float pj = et[j] / zt;
          if (pj == 0.0f) continue;  // zero teacher mass: 0 (also against a student −inf); NaN passes
          const float log_p = (u[j] - mt) * inv_t - log_zt;
          const float log_q = (x[ids[j]] - m) * inv_t - log_zT;
          kl += static_cast<double>(pj) * (log_p - log_q);
        }
        if (with_tail) {
          // The student's residual mass at T: Σ eT outside the teacher ids (summed directly, no cancellation).
          float* saved = buf.saved.data();
          for (int64_t j = 0; j < k; ++j) {
            saved[j] = eT[ids[j]];
            eT[ids[j]] = 0.0f;
          }
          double zo = 0.0;
          for (int64_t j = 0; j < V; ++j) zo += eT[j];
          for (int64_t j = 0; j < k; ++j) eT[ids[j]] = saved[j];
          const float q_tail = static_cast<float>(zo) / zT;
          p_tail = et[k] / zt;
          if (p_tail != 0.0f) {
            const float log_p = (u[k] - mt) * inv_t - log_zt;
            const float log_q = std::log(static_cast<float>(zo)) - log_zT;
            kl += static_cast<double>(p_tail) * (log_p - log_q);
          }
          // Outside K the student's q_j is compared with the teacher's tail spread like the student's own tail.
          if (q_tail > 0.0f) tail_factor = 1.0f - p_tail / q_tail;
        }
        loss += p.kd_weight * static_cast<float>(kl);
      }
      rows[n] = loss;

      if (g_out == nullptr) continue;
      const float inv_z1 = 1.0f / z1, inv_zT = 1.0f / zT;
      const bool smooth_on = has_ce && eps != 0.0f;
      const float smooth = smooth_on ? eps / static_cast<float>(count_u) : 0.0f;
      const float kd_dense = kd_coef * tail_factor;
      for (int64_t j = 0; j < V; ++j) {
        float gj = 0.0f;
        if (has_ce) gj += ce_coef * (e1[j] * inv_z1 - (x[j] != kNegInf ? smooth : 0.0f));
        if (has_kd) gj += kd_dense * eT[j] * inv_zT;
        g[j] = gj;
      }
      if (has_ce) g[y] -= ce_coef * (1.0f - eps);
      if (has_kd) {
        // At the teacher ids: kd_coef · (q − p) in place of the dense part's kd_coef · q · tail_factor.
        const float* et = buf.et.data();
        for (int64_t j = 0; j < k; ++j) {
          const float q = eT[ids[j]] * inv_zT;
          g[ids[j]] += kd_coef * (q * (1.0f - tail_factor) - et[j] / zt);
        }
      }
      for (int64_t j = 0; j < V; ++j) g_out[j] = static_cast<S>(g[j]);
    }
  });
}

int64_t count_and_check(const int64_t* y, const int64_t* idx, int64_t n, int64_t k, int64_t vocab,
                        int64_t ignore_index) {
  int64_t valid = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (y != nullptr) {
      const int64_t label = y[i];
      if (label == ignore_index) continue;
      TORCH_CHECK_VALUE(label >= 0 && label < vocab, "kd_loss: target holds labels outside [0, ", vocab,
                        ") that are not ignore_index=", ignore_index, ": [", label, "]");
    }
    ++valid;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t id = idx[i * k + j];
      TORCH_CHECK_VALUE(id >= 0 && id < vocab, "kd_loss: teacher_indices holds ids outside [0, ", vocab, "): [", id,
                        "]");
    }
  }
  return valid;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_forward_cpu(const at::Tensor& student, const at::Tensor& indices,
                                                            const at::Tensor& values,
                                                            const c10::optional<at::Tensor>& target,
                                                            KDLossParams params, Reduction reduction, bool bucket,
                                                            bool grad_student) {
  const int64_t N = student.size(0), V = student.size(1), k = indices.size(1);
  const int64_t* y = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t count = count_and_check(y, idx, N, k, V, params.ignore_index);
  params.grad_scale = reduction == Reduction::kMean ? 1.0f / static_cast<float>(std::max<int64_t>(count, 1)) : 1.0f;
  at::Tensor rows = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad = grad_student ? at::empty({N, V}, student.options()) : at::Tensor();
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_topk_cpu", [&] {
      run_topk<scalar_t>(student, idx, values.data_ptr<float>(), k, y, params, bucket, rows.data_ptr<float>(),
                         grad_student ? grad.data_ptr<scalar_t>() : nullptr);
    });
  }
  if (reduction == Reduction::kNone) return {rows, grad};
  const float* r = rows.data_ptr<float>();
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) total += r[n];
  if (reduction == Reduction::kMean) total /= static_cast<double>(std::max<int64_t>(count, 1));
  return {at::full({}, static_cast<float>(total), rows.options()), grad};
}

}  // namespace spacedkd
