// Fused KD + CE loss on CPU: declarations shared by kd_loss_cpu.cpp and bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace spacedkd {

// Weights of one kd_loss call, as the Python side computes them (see spacedkd_fast/loss/function.py).
struct KDLossParams {
  float inv_temperature;  // 1 / T
  float ce_weight;        // 1 − α (0 without a target)
  float kd_weight;        // α · T² (α with t_squared=False; T² or 1 without a target)
  float label_smoothing;  // ε
  int64_t ignore_index;
  float grad_scale;  // multiplies the gradients only (set by kd_loss_forward_cpu: 1 / valid rows for a mean)
};

enum class Reduction { kNone, kSum, kMean };

// student (K, R0, R1, V) and teacher (R0, R1, V), any strides, float32 / bfloat16 / float16;
// target (N,) int64 contiguous with N = R0·R1, or undefined; labels outside [0, V) that are not ignore_index raise
// a ValueError naming them.
// Returns (loss, grad_student (K, N, V) or undefined, grad_teacher (K, N, V) or undefined): loss is (K,) float32
// for kSum / kMean (over the non-ignored rows) and the (K, N) per-row losses for kNone; the gradients are those of
// the reduced loss, unscaled by any grad_output. Gradients of 1 MB and more come from a pool of reused buffers.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const c10::optional<at::Tensor>& target,
                                                                   KDLossParams params, Reduction reduction,
                                                                   bool grad_student, bool grad_teacher);

// Top-k teacher (kd_loss_topk_cpu.cpp): student (N, V) any strides, float32 / bfloat16 / float16; indices (N, k)
// int64 contiguous, distinct per row (the caller checks duplicates; ids outside [0, V) raise here); values (N, k)
// float32 contiguous (logits or log-probabilities); target as above. bucket: the teacher's residual mass at T = 1
// (values are log-probabilities) is one extra outcome against the student's residual mass.
// Returns (loss, grad_student (N, V) contiguous or undefined): loss is a 0-dim float32 for kSum / kMean, the (N,)
// per-row losses for kNone; the gradient is that of the reduced loss, unscaled by any grad_output.
std::tuple<at::Tensor, at::Tensor> kd_loss_topk_forward_cpu(const at::Tensor& student, const at::Tensor& indices,
                                                            const at::Tensor& values,
                                                            const c10::optional<at::Tensor>& target,
                                                            KDLossParams params, Reduction reduction, bool bucket,
                                                            bool grad_student);

// Free the pooled gradient buffers that no tensor holds (they are otherwise kept, up to 1 GiB, for reuse).
void release_cached_buffers();
size_t cached_buffer_bytes();

}  // namespace spacedkd
