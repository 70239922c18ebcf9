// Python bindings of spacedkd_fast._C: argument checks and the module table only; the math is in kd_loss_cpu.cpp
// (the loss) and seeds.cpp (per-sample seeds).
#include "kd_loss.h"
#include "seeds.h"

namespace {

#define SPACEDKD_CHECK(cond, ...) TORCH_CHECK(cond, "spacedkd_fast._C.kd_loss_forward: ", __VA_ARGS__)

bool supported_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                               const c10::optional<at::Tensor>& target,
                                                               double temperature, double ce_weight, double kd_weight,
                                                               double label_smoothing, int64_t ignore_index,
                                                               const std::string& reduction, bool grad_student,
                                                               bool grad_teacher) {
  SPACEDKD_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "student and teacher must be CPU tensors");
  SPACEDKD_CHECK(student.dim() == 4, "student must be (K, R0, R1, V), got ", student.sizes());
  SPACEDKD_CHECK(teacher.dim() == 3, "teacher must be (R0, R1, V), got ", teacher.sizes());
  SPACEDKD_CHECK(student.sizes().slice(1) == teacher.sizes(), "student ", student.sizes(), " and teacher ",
                 teacher.sizes(), " differ after the K dimension");
  SPACEDKD_CHECK(supported_dtype(student), "student must be float32, bfloat16 or float16, got ",
                 student.scalar_type());
  SPACEDKD_CHECK(supported_dtype(teacher), "teacher must be float32, bfloat16 or float16, got ",
                 teacher.scalar_type());
  SPACEDKD_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  if (target.has_value()) {
    const auto& y = *target;
    SPACEDKD_CHECK(y.device().is_cpu(), "target must be a CPU tensor");
    SPACEDKD_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.is_contiguous(),
                   "target must be a contiguous 1-D int64 tensor, got ", y.scalar_type(), " ", y.sizes());
    SPACEDKD_CHECK(y.size(0) == teacher.size(0) * teacher.size(1), "target has ", y.size(0), " labels for ",
                   teacher.size(0) * teacher.size(1), " rows");
  }
  spacedkd::Reduction mode;
  if (reduction == "mean") {
    mode = spacedkd::Reduction::kMean;
  } else if (reduction == "sum") {
    mode = spacedkd::Reduction::kSum;
  } else {
    SPACEDKD_CHECK(reduction == "none", "reduction must be mean, sum or none, got ", reduction);
    mode = spacedkd::Reduction::kNone;
  }
  spacedkd::KDLossParams params{static_cast<float>(1.0 / temperature), static_cast<float>(ce_weight),
                                static_cast<float>(kd_weight), static_cast<float>(label_smoothing), ignore_index,
                                1.0f};
  return spacedkd::kd_loss_forward_cpu(student, teacher, target, params, mode, grad_student, grad_teacher);
}

spacedkd::Reduction parse_reduction(const std::string& reduction) {
  if (reduction == "mean") return spacedkd::Reduction::kMean;
  if (reduction == "sum") return spacedkd::Reduction::kSum;
  TORCH_CHECK(reduction == "none", "spacedkd_fast._C: reduction must be mean, sum or none, got ", reduction);
  return spacedkd::Reduction::kNone;
}

#define SPACEDKD_TOPK_CHECK(cond, ...) TORCH_CHECK(cond, "spacedkd_fast._C.kd_loss_topk_forward: ", __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_forward(const at::Tensor& student, const at::Tensor& indices,
                                                        const at::Tensor& values,
                                                        const c10::optional<at::Tensor>& target, double temperature,
                                                        double ce_weight, double kd_weight, double label_smoothing,
                                                        int64_t ignore_index, const std::string& reduction,
                                                        bool bucket, bool grad_student) {
  SPACEDKD_TOPK_CHECK(student.device().is_cpu() && indices.device().is_cpu() && values.device().is_cpu(),
                      "student, indices and values must be CPU tensors");
  SPACEDKD_TOPK_CHECK(student.dim() == 2, "student must be (N, V), got ", student.sizes());
  SPACEDKD_TOPK_CHECK(supported_dtype(student), "student must be float32, bfloat16 or float16, got ",
                      student.scalar_type());
  SPACEDKD_TOPK_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
                      "indices must be a contiguous (N, k) int64 tensor, got ", indices.scalar_type(), " ",
                      indices.sizes());
  SPACEDKD_TOPK_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
                      "values must be a contiguous (N, k) float32 tensor, got ", values.scalar_type(), " ",
                      values.sizes());
  SPACEDKD_TOPK_CHECK(indices.sizes() == values.sizes() && indices.size(0) == student.size(0),
                      "indices ", indices.sizes(), ", values ", values.sizes(), " and student ", student.sizes(),
                      " do not match");
  SPACEDKD_TOPK_CHECK(indices.size(1) >= 1 && indices.size(1) <= student.size(1), "k = ", indices.size(1),
                      " must be in [1, V = ", student.size(1), "]");
  SPACEDKD_TOPK_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  if (target.has_value()) {
    const auto& y = *target;
    SPACEDKD_TOPK_CHECK(y.device().is_cpu() && y.scalar_type() == at::kLong && y.dim() == 1 && y.is_contiguous() &&
                            y.size(0) == student.size(0),
                        "target must be a contiguous (N,) int64 CPU tensor, got ", y.scalar_type(), " ", y.sizes());
  }
  spacedkd::KDLossParams params{static_cast<float>(1.0 / temperature), static_cast<float>(ce_weight),
                                static_cast<float>(kd_weight), static_cast<float>(label_smoothing), ignore_index,
                                1.0f};
  return spacedkd::kd_loss_topk_forward_cpu(student, indices, values, target, params, parse_reduction(reduction),
                                            bucket, grad_student);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spacedkd_fast C++ CPU kernels";
  m.def("kd_loss_forward", &kd_loss_forward,
        "Fused KD+CE forward on CPU: per-row losses and the student/teacher gradients in one pass over each row.",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("temperature"), py::arg("ce_weight"),
        py::arg("kd_weight"), py::arg("label_smoothing"), py::arg("ignore_index"), py::arg("reduction"),
        py::arg("grad_student"), py::arg("grad_teacher"));
  m.def("kd_loss_topk_forward", &kd_loss_topk_forward,
        "Fused KD+CE forward on CPU against a top-k teacher: per-row (or reduced) losses and the dense student "
        "gradient in one pass over each row.",
        py::arg("student"), py::arg("indices"), py::arg("values"), py::arg("target"), py::arg("temperature"),
        py::arg("ce_weight"), py::arg("kd_weight"), py::arg("label_smoothing"), py::arg("ignore_index"),
        py::arg("reduction"), py::arg("bucket"), py::arg("grad_student"));
  m.def("derive_seeds", &spacedkd::derive_seeds,
        "Per-sample seeds: 63 bits of BLAKE2b-64(head + str(k) + ')') for k < count (derive_seed's values).",
        py::arg("head"), py::arg("count"));
  m.def("release_cached_buffers", &spacedkd::release_cached_buffers,
        "Free the pooled CPU gradient buffers no tensor holds (kept, up to 1 GiB, so a training step reuses them).");
  m.def("cached_buffer_bytes", &spacedkd::cached_buffer_bytes, "Bytes of pooled CPU gradient buffers held for reuse.");
}
