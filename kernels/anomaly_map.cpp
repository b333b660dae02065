// Operator schema, shared input checks and the Python extension module (mrkd._C).
#include "anomaly_map.h"

#include <ATen/ATen.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <cmath>

namespace mrkd {
namespace detail {

void check_anomaly_map_inputs(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                              double sigma, c10::DeviceType device_type) {
  TORCH_CHECK(!teacher.empty(), "anomaly_map: teacher list is empty");
  TORCH_CHECK(!student.empty(), "anomaly_map: student list is empty");
  TORCH_CHECK(teacher.size() == student.size(), "anomaly_map: teacher has ", teacher.size(),
              " scales but student has ", student.size());
  TORCH_CHECK(out_size.size() == 2, "anomaly_map: out_size must be (height, width), got ", out_size.size(),
              " values");
  TORCH_CHECK(out_size[0] > 0 && out_size[1] > 0, "anomaly_map: out_size must be positive, got (", out_size[0],
              ", ", out_size[1], ")");
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0.0, "anomaly_map: sigma must be finite and >= 0, got ", sigma);
  // In double, before any conversion to an integer: a huge sigma must not overflow the radius.
  const double radius = kGaussianTruncate * sigma + 0.5;
  TORCH_CHECK(radius <= static_cast<double>(kMaxBlurRadius), "anomaly_map: sigma ", sigma,
              " needs a blur radius of ", radius, " pixels, more than the supported ", kMaxBlurRadius);
  const at::Tensor& first = teacher[0];
  TORCH_CHECK(first.dim() == 4, "anomaly_map: teacher[0] must be 4-D (B, C, H, W), got ", first.dim(), "-D");
  const int64_t batch = first.size(0);
  TORCH_CHECK(batch >= 1, "anomaly_map: batch size must be >= 1");
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "anomaly_map: unsupported dtype ", dtype, "; expected float32, float16 or bfloat16");
  TORCH_CHECK(first.device().type() == device_type, "anomaly_map: kernel for ", device_type,
              " called with tensors on ", first.device());
  for (size_t k = 0; k < teacher.size(); ++k) {
    for (const at::Tensor* t : {&teacher[k], &student[k]}) {
      const char* which = t == &teacher[k] ? "teacher" : "student";
      TORCH_CHECK(t->defined(), "anomaly_map: ", which, "[", k, "] is undefined");
      TORCH_CHECK(t->dim() == 4, "anomaly_map: ", which, "[", k, "] must be 4-D (B, C, H, W), got ", t->dim(),
                  "-D");
      TORCH_CHECK(t->device() == first.device(), "anomaly_map: mixed devices: ", which, "[", k, "] is on ",
                  t->device(), " but teacher[0] is on ", first.device());
      TORCH_CHECK(t->scalar_type() == dtype, "anomaly_map: mixed dtypes: ", which, "[", k, "] is ",
                  t->scalar_type(), " but teacher[0] is ", dtype);
      TORCH_CHECK(t->size(0) == batch, "anomaly_map: batch mismatch: ", which, "[", k, "] has batch ",
                  t->size(0), " but teacher[0] has ", batch);
      TORCH_CHECK(t->size(1) > 0 && t->size(2) > 0 && t->size(3) > 0, "anomaly_map: ", which, "[", k,
                  "] has an empty dimension: ", t->sizes());
    }
    TORCH_CHECK(teacher[k].sizes() == student[k].sizes(), "anomaly_map: shape mismatch at scale ", k,
                ": teacher ", teacher[k].sizes(), " vs student ", student[k].sizes());
  }
}

ScaleFeatures normalize_layout(const at::Tensor& teacher, const at::Tensor& student) {
  // Prefer the teacher's layout; the student follows it so one index scheme reads both.
  if (teacher.is_contiguous()) {
    return {teacher, student.contiguous(), FeatureLayout::kNCHW};
  }
  if (teacher.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {teacher, student.contiguous(at::MemoryFormat::ChannelsLast), FeatureLayout::kNHWC};
  }
  if (student.is_contiguous(at::MemoryFormat::ChannelsLast) && !student.is_contiguous()) {
    return {teacher.contiguous(at::MemoryFormat::ChannelsLast), student, FeatureLayout::kNHWC};
  }
  return {teacher.contiguous(), student.contiguous(), FeatureLayout::kNCHW};
}

int64_t gaussian_radius(double sigma) {
  if (sigma <= 0.0) return 0;
  return static_cast<int64_t>(kGaussianTruncate * sigma + 0.5);
}

std::vector<float> gaussian_weights(double sigma) {
  const int64_t radius = gaussian_radius(sigma);
  if (radius == 0) return {1.0f};
  std::vector<double> phi(2 * radius + 1);
  double total = 0.0;
  for (int64_t i = -radius; i <= radius; ++i) {
    phi[i + radius] = std::exp(-0.5 / (sigma * sigma) * static_cast<double>(i * i));
    total += phi[i + radius];
  }
  std::vector<float> weights(phi.size());
  for (size_t i = 0; i < phi.size(); ++i) weights[i] = static_cast<float>(phi[i] / total);
  return weights;
}

}  // namespace detail
}  // namespace mrkd

TORCH_LIBRARY(mrkd, m) {
  m.def(
      "anomaly_map(Tensor[] teacher, Tensor[] student, int[] out_size, float sigma=4.0, bool product=False) -> "
      "(Tensor maps, Tensor scores)");
}

// Importing mrkd._C runs the static registrations above and in the kernel files.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "mrkd fused operators, registered as torch.ops.mrkd.*";
#ifdef WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
