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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spacedkd_fast C++ CPU kernels";
  m.def("kd_loss_forward", &kd_loss_forward,
        "Fused KD+CE forward on CPU: per-row losses and the student/teacher gradients in one pass over each row.",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("temperature"), py::arg("ce_weight"),
        py::arg("kd_weight"), py::arg("label_smoothing"), py::arg("ignore_index"), py::arg("reduction"),
        py::arg("grad_student"), py::arg("grad_teacher"));
  m.def("derive_seeds", &spacedkd::derive_seeds,
        "Per-sample seeds: 63 bits of BLAKE2b-64(head + str(k) + ')') for k < count (derive_seed's values).",
        py::arg("head"), py::arg("count"));
  m.def("release_cached_buffers", &spacedkd::release_cached_buffers,
        "Free the pooled CPU gradient buffers no tensor holds (kept, up to 1 GiB, so a training step reuses them).");
  m.def("cached_buffer_bytes", &spacedkd::cached_buffer_bytes, "Bytes of pooled CPU gradient buffers held for reuse.");
}
