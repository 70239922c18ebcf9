// SpacedkdCropFlipRotate: the crop -> flip -> rotate augmentation of spacedkd_fast.data.augment as one DALI CPU
// operator, HWC uint8 in, CHW uint8 out.
//
// Why a custom operator: on CPU, DALI's cost for CIFAR-sized images is per sample and per operator, and the stock
// graph needs three (slice for the zero-padded crop, warp_affine for flip + rotation, transpose to CHW). This one
// computes each output pixel's source once, exactly as the spec does (float32, one IEEE operation at a time: the
// file is compiled with -ffp-contract=off, so no fused multiply-add), so it is byte-identical to
// augment_reference_numpy, ties included. spacedkd_fast/data/dali_ops.py compiles it against the installed DALI.
//
// Inputs (per sample):  0: uint8 (H, W, C), layout "HWC";
//                       1: float32 (5,): dy, dx, flip (0 or 1), cos, sin  (dy, dx integers in float32, exact).
// Output (per sample):  uint8 (C, H, W), layout "CHW".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dali/pipeline/operator/operator.h"

namespace spacedkd {

class CropFlipRotateCPU : public ::dali::Operator<::dali::CPUBackend> {
 public:
  explicit CropFlipRotateCPU(const ::dali::OpSpec &spec) : ::dali::Operator<::dali::CPUBackend>(spec) {}

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &images = ws.Input<::dali::CPUBackend>(0);
    const auto &params = ws.Input<::dali::CPUBackend>(1);
    DALI_ENFORCE(images.type() == ::DALI_UINT8, "SpacedkdCropFlipRotate: images must be uint8");
    DALI_ENFORCE(images.sample_dim() == 3, "SpacedkdCropFlipRotate: images must be (H, W, C)");
    DALI_ENFORCE(params.type() == ::DALI_FLOAT, "SpacedkdCropFlipRotate: params must be float32");
    int n = images.num_samples();
    ::dali::TensorListShape<> shape(n, 3);
    for (int i = 0; i < n; i++) {
      auto s = images.tensor_shape(i);
      DALI_ENFORCE(params.tensor_shape(i).num_elements() == 5,
                   "SpacedkdCropFlipRotate: params must hold 5 floats per sample (dy, dx, flip, cos, sin)");
      shape.set_tensor_shape(i, ::dali::TensorShape<>{s[2], s[0], s[1]});
    }
    output_desc.resize(1);
    output_desc[0] = {shape, ::DALI_UINT8};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &images = ws.Input<::dali::CPUBackend>(0);
    const auto &params = ws.Input<::dali::CPUBackend>(1);
    auto &output = ws.Output<::dali::CPUBackend>(0);
    output.SetLayout("CHW");
    auto &pool = ws.GetThreadPool();
    int n = images.num_samples();
    // One task per thread, each a contiguous run of samples: a 32x32 image is ~1 us of work, less than a task.
    int tasks = std::max(1, std::min(n, pool.NumThreads()));
    for (int t = 0; t < tasks; t++) {
      int begin = static_cast<int>(static_cast<int64_t>(n) * t / tasks);
      int end = static_cast<int>(static_cast<int64_t>(n) * (t + 1) / tasks);
      pool.AddWork([&, begin, end](int) {
        for (int i = begin; i < end; i++) {
          auto s = images.tensor_shape(i);
          Sample(images.tensor<uint8_t>(i), params.tensor<float>(i), output.mutable_tensor<uint8_t>(i),
                 static_cast<int>(s[0]), static_cast<int>(s[1]), static_cast<int>(s[2]));
        }
      });
    }
    pool.RunAll();
  }

 private:
  // Source pixel (flat index into the H x W image) of each output pixel of one row, or -1 for zero fill.
  static void SourceRow(const float *__restrict cos_u, const float *__restrict sin_u, int32_t *__restrict source,
                        float sin_v, float cos_v, float cx, float cy, int flip_base, int flip_sign, int dx, int dy,
                        int H, int W) {
    for (int x = 0; x < W; x++) {
      // The spec's order: (cos*u - sin*v) + cx and (sin*u + cos*v) + cy, each step rounded to float32.
      const float sx = (cos_u[x] - sin_v) + cx;
      const float sy = (sin_u[x] + cos_v) + cy;
      const int rx = static_cast<int>(std::floor(sx + 0.5f));
      const int ry = static_cast<int>(std::floor(sy + 0.5f));
      const int ix = flip_base + flip_sign * rx + dx, iy = ry + dy;  // rotation source -> flip -> crop
      const bool inside = (static_cast<unsigned>(rx) < static_cast<unsigned>(W)) &
                          (static_cast<unsigned>(ry) < static_cast<unsigned>(H)) &
                          (static_cast<unsigned>(ix) < static_cast<unsigned>(W)) &
                          (static_cast<unsigned>(iy) < static_cast<unsigned>(H));
      source[x] = inside ? iy * W + ix : -1;
    }
  }

  // One image. Pass 1 (per row, branch-free so the compiler vectorises it) finds each output pixel's source pixel
  // in the image, or -1 for zero fill; pass 2 gathers the channels into the CHW planes.
  static void Sample(const uint8_t *img, const float *p, uint8_t *out, int H, int W, int C) {
    const int dy = static_cast<int>(p[0]), dx = static_cast<int>(p[1]);
    const bool flip = p[2] != 0.0f;
    const float cos = p[3], sin = p[4];
    const float cy = (static_cast<float>(H) - 1.0f) / 2.0f, cx = (static_cast<float>(W) - 1.0f) / 2.0f;
    // out2[ry, rx] = out1[ry, flip ? W-1-rx : rx]: column = flip_base + flip_sign * rx.
    const int flip_base = flip ? W - 1 : 0, flip_sign = flip ? -1 : 1;
    const int64_t plane = static_cast<int64_t>(H) * W;
    std::vector<float> scratch(2 * static_cast<size_t>(W));
    std::vector<int32_t> source_row(W);
    float *__restrict cos_u = scratch.data(), *__restrict sin_u = scratch.data() + W;
    int32_t *__restrict source = source_row.data();
    for (int x = 0; x < W; x++) {
      const float u = static_cast<float>(x) - cx;
      cos_u[x] = cos * u;
      sin_u[x] = sin * u;
    }
    for (int y = 0; y < H; y++) {
      const float v = static_cast<float>(y) - cy;
      const float sin_v = sin * v, cos_v = cos * v;
      SourceRow(cos_u, sin_u, source, sin_v, cos_v, cx, cy, flip_base, flip_sign, dx, dy, H, W);
      uint8_t *row = out + static_cast<int64_t>(y) * W;
      if (C == 3) {
        for (int x = 0; x < W; x++) {
          const int s = source[x];
          const uint8_t *px = img + 3 * static_cast<int64_t>(s < 0 ? 0 : s);
          row[x] = s < 0 ? 0 : px[0];
          row[x + plane] = s < 0 ? 0 : px[1];
          row[x + 2 * plane] = s < 0 ? 0 : px[2];
        }
      } else {
        for (int x = 0; x < W; x++) {
          const int s = source[x];
          const uint8_t *px = img + C * static_cast<int64_t>(s < 0 ? 0 : s);
          for (int c = 0; c < C; c++) row[x + c * plane] = s < 0 ? 0 : px[c];
        }
      }
    }
  }
};

}  // namespace spacedkd

DALI_REGISTER_OPERATOR(SpacedkdCropFlipRotate, ::spacedkd::CropFlipRotateCPU, ::dali::CPU);

DALI_SCHEMA(SpacedkdCropFlipRotate)
    .DocStr("spacedkd_fast's crop -> flip -> rotate (nearest neighbour, zero fill): HWC uint8 in, CHW uint8 out; "
            "per-sample parameters (dy, dx, flip, cos, sin) as a float32 (5,) input.")
    .NumInput(2)
    .NumOutput(1);
