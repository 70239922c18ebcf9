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
  float grad_scale;  // multiplies the gradients only (1 / number of non-ignored rows for a mean)
};

// student (K, R0, R1, V) and teacher (R0, R1, V), any strides, float32 / bfloat16 / float16;
// target (N,) int64 contiguous with N = R0·R1, or undefined.
// Returns (loss (K, N) float32, grad_student (K, N, V) or undefined, grad_teacher (K, N, V) or undefined):
// per-row losses and the gradients of each row's loss times params.grad_scale, unscaled by any grad_output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const c10::optional<at::Tensor>& target,
                                                                   const KDLossParams& params, bool grad_student,
                                                                   bool grad_teacher);

}  // namespace spacedkd
