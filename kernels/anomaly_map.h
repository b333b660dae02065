// Fused anomaly map: per-scale cosine distance, bilinear upsample (align_corners=True), sum (or, with `product`,
// product) over scales, Gaussian blur (scipy "reflect" border, truncated at 4 sigma), max per image.
// One registered operator, torch.ops.mrkd.anomaly_map, with a CPU kernel (cpu/) and a CUDA kernel (cuda/).
// A NaN or infinite feature value anywhere in an image (teacher or student, any scale) makes its score NaN: such a
// value always gives a NaN cosine distance at its pixel, and both kernels flag the image when they compute it, so
// even a pixel that the bilinear step never reads is seen. The map holds NaN wherever the bad value reaches.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace mrkd {

using AnomalyMapResult = std::tuple<at::Tensor, at::Tensor>;

// Same epsilon as at::cosine_similarity: each norm is clamped to at least kCosineEps.
constexpr double kCosineEps = 1e-8;
// scipy.ndimage.gaussian_filter(truncate=4.0)
constexpr double kGaussianTruncate = 4.0;
// Largest blur radius (pixels) the kernels take; a larger sigma is refused by check_anomaly_map_inputs (radius
// and 2 * radius + out_size must stay far inside int, which the CUDA kernel indexes with). Same as mrkd/ops.py.
constexpr int64_t kMaxBlurRadius = int64_t{1} << 20;

namespace detail {

// Feature-map memory layouts the kernels read directly; anything else is made contiguous first.
enum class FeatureLayout : int { kNCHW = 0, kNHWC = 1 };

// Checks every input (TORCH_CHECK); `device_type` is the device the calling kernel runs on.
void check_anomaly_map_inputs(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                              double sigma, c10::DeviceType device_type);

// Teacher/student of one scale in a layout the kernels read: both NCHW-contiguous or both channels_last.
struct ScaleFeatures {
  at::Tensor teacher;
  at::Tensor student;
  FeatureLayout layout;
};
ScaleFeatures normalize_layout(const at::Tensor& teacher, const at::Tensor& student);

// radius = int(4 * sigma + 0.5) like scipy; 0 when sigma == 0 (no blur). Callers check the inputs first (sigma
// finite, radius <= kMaxBlurRadius).
int64_t gaussian_radius(double sigma);
// Normalised 1-D Gaussian of 2 * radius + 1 taps (computed in double like scipy); {1} when sigma == 0.
std::vector<float> gaussian_weights(double sigma);

// scipy "reflect" (half-sample symmetric) index for any i, including borders wider than the line.
inline int64_t reflect_index(int64_t i, int64_t n) {
  const int64_t period = 2 * n;
  int64_t m = i % period;
  if (m < 0) m += period;
  return m < n ? m : period - 1 - m;
}

}  // namespace detail

AnomalyMapResult anomaly_map_cpu(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                 double sigma, bool product);
#ifdef WITH_CUDA
AnomalyMapResult anomaly_map_cuda(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                  double sigma, bool product);
#endif

}  // namespace mrkd
