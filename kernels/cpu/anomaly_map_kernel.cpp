// CPU kernel of mrkd::anomaly_map.
// Pass 1 reads every feature map once: per pixel dot(t, s), |t|^2, |s|^2 with vectorised channel loops.
// Pass 2 (per output row) upsamples and sums (or multiplies) the per-scale distances, then blurs horizontally.
// Pass 3 blurs vertically and takes the per-image max. All passes are parallel over (image, rows).
// A NaN distance in pass 1 (from a NaN or infinite feature value) or a NaN map value makes the image's score NaN.
#include "../anomaly_map.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mrkd {
namespace {

using detail::FeatureLayout;

// Branch-free conversions so the channel loops vectorise (c10's scalar conversions may not).
inline float to_float(float v) { return v; }

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }

inline float to_float(c10::Half v) {
  // IEEE half -> float without branches (the FP16 library's fp16_ieee_to_fp32_value).
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

#define MRKD_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MRKD_INLINE __attribute__((always_inline)) inline

// NCHW: accumulate 4 channel planes at a time into per-pixel buffers; inner loops run over contiguous pixels.
template <typename scalar_t>
MRKD_INLINE void accumulate_nchw(const scalar_t* __restrict t, const scalar_t* __restrict s, int64_t channels,
                                 int64_t plane, int64_t n, float* __restrict dot, float* __restrict tt,
                                 float* __restrict ss) {
  for (int64_t i = 0; i < n; ++i) dot[i] = tt[i] = ss[i] = 0.0f;
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) {
    const scalar_t* t0 = t + c * plane;
    const scalar_t* t1 = t0 + plane;
    const scalar_t* t2 = t1 + plane;
    const scalar_t* t3 = t2 + plane;
    const scalar_t* s0 = s + c * plane;
    const scalar_t* s1 = s0 + plane;
    const scalar_t* s2 = s1 + plane;
    const scalar_t* s3 = s2 + plane;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float a0 = to_float(t0[i]), a1 = to_float(t1[i]), a2 = to_float(t2[i]), a3 = to_float(t3[i]);
      const float b0 = to_float(s0[i]), b1 = to_float(s1[i]), b2 = to_float(s2[i]), b3 = to_float(s3[i]);
      dot[i] += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);
      tt[i] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
      ss[i] += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3);
    }
  }
  for (; c < channels; ++c) {
    const scalar_t* t0 = t + c * plane;
    const scalar_t* s0 = s + c * plane;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float a0 = to_float(t0[i]), b0 = to_float(s0[i]);
      dot[i] += a0 * b0;
      tt[i] += a0 * a0;
      ss[i] += b0 * b0;
    }
  }
}

// NHWC: each pixel's channels are contiguous; one vectorised reduction per pixel.
template <typename scalar_t>
MRKD_INLINE void accumulate_nhwc(const scalar_t* __restrict t, const scalar_t* __restrict s, int64_t channels,
                                 int64_t n, float* __restrict dot, float* __restrict tt, float* __restrict ss) {
  for (int64_t p = 0; p < n; ++p) {
    const scalar_t* tp = t + p * channels;
    const scalar_t* sp = s + p * channels;
    float d = 0.0f, a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : d, a, b)
    for (int64_t c = 0; c < channels; ++c) {
      const float x = to_float(tp[c]), y = to_float(sp[c]);
      d += x * y;
      a += x * x;
      b += y * y;
    }
    dot[p] = d;
    tt[p] = a;
    ss[p] = b;
  }
}

// One function per dtype and layout so target_clones (runtime AVX-512 / AVX2 / baseline choice) applies.
#define MRKD_DEFINE_ACCUMULATE(scalar_t, suffix)                                                               \
  MRKD_HOT void accumulate_nchw_##suffix(const scalar_t* t, const scalar_t* s, int64_t channels, int64_t plane, \
                                         int64_t n, float* dot, float* tt, float* ss) {                         \
    accumulate_nchw<scalar_t>(t, s, channels, plane, n, dot, tt, ss);                                           \
  }                                                                                                             \
  MRKD_HOT void accumulate_nhwc_##suffix(const scalar_t* t, const scalar_t* s, int64_t channels, int64_t n,     \
                                         float* dot, float* tt, float* ss) {                                    \
    accumulate_nhwc<scalar_t>(t, s, channels, n, dot, tt, ss);                                                  \
  }
MRKD_DEFINE_ACCUMULATE(float, f32)
MRKD_DEFINE_ACCUMULATE(c10::Half, f16)
MRKD_DEFINE_ACCUMULATE(c10::BFloat16, bf16)
#undef MRKD_DEFINE_ACCUMULATE

inline void accumulate(const float* t, const float* s, FeatureLayout layout, int64_t channels, int64_t plane,
                       int64_t n, float* dot, float* tt, float* ss) {
  if (layout == FeatureLayout::kNCHW) {
    accumulate_nchw_f32(t, s, channels, plane, n, dot, tt, ss);
  } else {
    accumulate_nhwc_f32(t, s, channels, n, dot, tt, ss);
  }
}
inline void accumulate(const c10::Half* t, const c10::Half* s, FeatureLayout layout, int64_t channels,
                       int64_t plane, int64_t n, float* dot, float* tt, float* ss) {
  if (layout == FeatureLayout::kNCHW) {
    accumulate_nchw_f16(t, s, channels, plane, n, dot, tt, ss);
  } else {
    accumulate_nhwc_f16(t, s, channels, n, dot, tt, ss);
  }
}
inline void accumulate(const c10::BFloat16* t, const c10::BFloat16* s, FeatureLayout layout, int64_t channels,
                       int64_t plane, int64_t n, float* dot, float* tt, float* ss) {
  if (layout == FeatureLayout::kNCHW) {
    accumulate_nchw_bf16(t, s, channels, plane, n, dot, tt, ss);
  } else {
    accumulate_nhwc_bf16(t, s, channels, n, dot, tt, ss);
  }
}

// Writes the distances; returns whether any of them is NaN (a NaN or infinite feature value at that pixel).
MRKD_HOT bool finish_cosine_distance(const float* dot, const float* tt, const float* ss, int64_t n, float* out) {
  const float eps = static_cast<float>(kCosineEps);
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float nt = std::max(std::sqrt(tt[i]), eps);
    const float ns = std::max(std::sqrt(ss[i]), eps);
    const float d = 1.0f - dot[i] / (nt * ns);
    out[i] = d;
    nan |= static_cast<int>(d != d);
  }
  return nan != 0;
}

// Elements (channels x pixels) per work item of pass 1: items of equal cost balance threads across scales.
constexpr int64_t kElementsPerItem = 1 << 18;

struct ScaleWork {
  detail::ScaleFeatures features;
  int64_t channels, height, width, chunk, chunks_per_image;
  int64_t item_begin;   // first work item of this scale inside an image's items
  int64_t dist_offset;  // offset of this scale's [B, H*W] distance map in the scratch buffer
};

// `item_nan[item]` is set to 1 when the item's distances hold a NaN (items are ordered image-major).
template <typename scalar_t>
void cosine_distances(const std::vector<ScaleWork>& scales, int64_t batch, int64_t items_per_image, float* dist,
                      uint8_t* item_nan) {
  int64_t max_chunk = 0;
  for (const auto& sw : scales) max_chunk = std::max(max_chunk, sw.chunk);
  // Items ordered (image, scale, chunk): contiguous ranges of items cover similar bytes.
  at::parallel_for(0, batch * items_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffers(3 * max_chunk);
    float* dot = buffers.data();
    float* tt = dot + max_chunk;
    float* ss = tt + max_chunk;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_image;
      const int64_t local = item % items_per_image;
      size_t k = 0;
      while (k + 1 < scales.size() && local >= scales[k + 1].item_begin) ++k;
      const ScaleWork& sw = scales[k];
      const int64_t plane = sw.height * sw.width;
      const int64_t p0 = (local - sw.item_begin) * sw.chunk;
      const int64_t n = std::min(sw.chunk, plane - p0);
      const scalar_t* t = sw.features.teacher.template const_data_ptr<scalar_t>() + b * sw.channels * plane;
      const scalar_t* s = sw.features.student.template const_data_ptr<scalar_t>() + b * sw.channels * plane;
      const int64_t pixel_stride = sw.features.layout == FeatureLayout::kNCHW ? 1 : sw.channels;
      accumulate(t + p0 * pixel_stride, s + p0 * pixel_stride, sw.features.layout, sw.channels, plane, n, dot, tt,
                 ss);
      item_nan[item] = finish_cosine_distance(dot, tt, ss, n, dist + sw.dist_offset + b * plane + p0) ? 1 : 0;
    }
  });
}

// Bilinear source taps along one axis, align_corners=True (as torch's upsample_bilinear2d).
struct Taps {
  std::vector<int64_t> lo, hi;
  std::vector<float> frac;
};

Taps bilinear_taps(int64_t in, int64_t out) {
  Taps taps;
  taps.lo.resize(out);
  taps.hi.resize(out);
  taps.frac.resize(out);
  const float scale = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  for (int64_t o = 0; o < out; ++o) {
    const float src = scale * static_cast<float>(o);
    const int64_t lo = std::min(static_cast<int64_t>(src), in - 1);
    taps.lo[o] = lo;
    taps.hi[o] = lo + (lo < in - 1 ? 1 : 0);
    taps.frac[o] = src - static_cast<float>(lo);
  }
  return taps;
}

std::vector<int64_t> reflect_table(int64_t n, int64_t radius) {
  std::vector<int64_t> table(n + 2 * radius);
  for (int64_t j = 0; j < n + 2 * radius; ++j) table[j] = detail::reflect_index(j - radius, n);
  return table;
}

MRKD_HOT void lerp_rows(const float* a, const float* b, float frac, int64_t n, float* out) {
  const float keep = 1.0f - frac;
  for (int64_t i = 0; i < n; ++i) out[i] = keep * a[i] + frac * b[i];
}

MRKD_HOT void convolve_row(const float* padded, const float* weights, int64_t taps, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
  for (int64_t k = 0; k < taps; ++k) {
    const float w = weights[k];
    const float* src = padded + k;
    for (int64_t i = 0; i < n; ++i) out[i] += w * src[i];
  }
}

MRKD_HOT void accumulate_weighted_row(const float* row, float w, int64_t n, float* acc) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * row[i];
}

// Max that propagates NaN (std::max and fmax skip it: one NaN pixel must not leave a finite score).
MRKD_HOT float row_max(const float* row, int64_t n, float current) {
  float m = current;
  int nan = static_cast<int>(current != current);
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, row[i]);
    nan |= static_cast<int>(row[i] != row[i]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// Rows per work item of the upsample/blur passes.
constexpr int64_t kRowsPerItem = 16;

AnomalyMapResult anomaly_map_cpu_impl(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                      double sigma, bool product) {
  detail::check_anomaly_map_inputs(teacher, student, out_size, sigma, c10::DeviceType::CPU);
  const int64_t batch = teacher[0].size(0);
  const int64_t out_h = out_size[0], out_w = out_size[1];

  std::vector<ScaleWork> scales;
  int64_t items_per_image = 0, dist_total = 0;
  for (size_t k = 0; k < teacher.size(); ++k) {
    ScaleWork sw{detail::normalize_layout(teacher[k], student[k]), teacher[k].size(1), teacher[k].size(2),
                 teacher[k].size(3), 0, 0, 0, 0};
    const int64_t plane = sw.height * sw.width;
    sw.chunk = std::min(plane, std::max<int64_t>(16, (kElementsPerItem / sw.channels + 15) / 16 * 16));
    sw.chunks_per_image = (plane + sw.chunk - 1) / sw.chunk;
    sw.item_begin = items_per_image;
    sw.dist_offset = dist_total;
    items_per_image += sw.chunks_per_image;
    dist_total += batch * plane;
    scales.push_back(std::move(sw));
  }

  at::Tensor dist = at::empty({dist_total}, teacher[0].options().dtype(at::kFloat));
  float* dist_data = dist.data_ptr<float>();
  std::vector<uint8_t> item_nan(batch * items_per_image, 0);
  switch (teacher[0].scalar_type()) {
    case at::kFloat:
      cosine_distances<float>(scales, batch, items_per_image, dist_data, item_nan.data());
      break;
    case at::kHalf:
      cosine_distances<c10::Half>(scales, batch, items_per_image, dist_data, item_nan.data());
      break;
    case at::kBFloat16:
      cosine_distances<c10::BFloat16>(scales, batch, items_per_image, dist_data, item_nan.data());
      break;
    default:
      TORCH_CHECK(false, "anomaly_map: unsupported dtype ", teacher[0].scalar_type());
  }

  std::vector<Taps> taps_y, taps_x;
  for (const auto& sw : scales) {
    taps_y.push_back(bilinear_taps(sw.height, out_h));
    taps_x.push_back(bilinear_taps(sw.width, out_w));
  }
  const std::vector<float> weights = detail::gaussian_weights(sigma);
  const int64_t radius = detail::gaussian_radius(sigma);
  const int64_t n_taps = static_cast<int64_t>(weights.size());
  const std::vector<int64_t> reflect_x = reflect_table(out_w, radius);
  const std::vector<int64_t> reflect_y = reflect_table(out_h, radius);
  int64_t max_source_width = 0;
  for (const auto& sw : scales) max_source_width = std::max(max_source_width, sw.width);

  at::Tensor horizontal = at::empty({batch, out_h, out_w}, dist.options());
  float* horizontal_data = horizontal.data_ptr<float>();
  const int64_t row_items = (out_h + kRowsPerItem - 1) / kRowsPerItem;

  // Pass 2: upsample + sum (product) over scales + horizontal blur, one output row at a time.
  at::parallel_for(0, batch * row_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> summed(out_w + 2 * radius), padded(out_w + 2 * radius), source_row(max_source_width);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / row_items;
      const int64_t y_begin = (item % row_items) * kRowsPerItem;
      const int64_t y_end = std::min(out_h, y_begin + kRowsPerItem);
      for (int64_t y = y_begin; y < y_end; ++y) {
        std::fill(summed.begin(), summed.begin() + out_w, product ? 1.0f : 0.0f);
        for (size_t k = 0; k < scales.size(); ++k) {
          const ScaleWork& sw = scales[k];
          const float* map = dist_data + sw.dist_offset + b * sw.height * sw.width;
          lerp_rows(map + taps_y[k].lo[y] * sw.width, map + taps_y[k].hi[y] * sw.width, taps_y[k].frac[y],
                    sw.width, source_row.data());
          const Taps& tx = taps_x[k];
          if (product) {
            for (int64_t x = 0; x < out_w; ++x) {
              summed[x] *= (1.0f - tx.frac[x]) * source_row[tx.lo[x]] + tx.frac[x] * source_row[tx.hi[x]];
            }
          } else {
            for (int64_t x = 0; x < out_w; ++x) {
              summed[x] += (1.0f - tx.frac[x]) * source_row[tx.lo[x]] + tx.frac[x] * source_row[tx.hi[x]];
            }
          }
        }
        for (int64_t j = 0; j < out_w + 2 * radius; ++j) padded[j] = summed[reflect_x[j]];
        convolve_row(padded.data(), weights.data(), n_taps, out_w, horizontal_data + (b * out_h + y) * out_w);
      }
    }
  });

  // Pass 3: vertical blur + per-image max.
  at::Tensor maps = at::empty({batch, 1, out_h, out_w}, dist.options());
  float* maps_data = maps.data_ptr<float>();
  std::vector<float> item_max(batch * row_items, -std::numeric_limits<float>::infinity());
  at::parallel_for(0, batch * row_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / row_items;
      const int64_t y_begin = (item % row_items) * kRowsPerItem;
      const int64_t y_end = std::min(out_h, y_begin + kRowsPerItem);
      const float* image = horizontal_data + b * out_h * out_w;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t y = y_begin; y < y_end; ++y) {
        float* out = maps_data + (b * out_h + y) * out_w;
        std::fill(out, out + out_w, 0.0f);
        for (int64_t k = 0; k < n_taps; ++k) {
          accumulate_weighted_row(image + reflect_y[y + k] * out_w, weights[k], out_w, out);
        }
        m = row_max(out, out_w, m);
      }
      item_max[item] = m;
    }
  });

  at::Tensor scores = at::empty({batch}, dist.options());
  float* scores_data = scores.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    bool nan = std::any_of(item_nan.begin() + b * items_per_image, item_nan.begin() + (b + 1) * items_per_image,
                           [](uint8_t flag) { return flag != 0; });
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = b * row_items; i < (b + 1) * row_items; ++i) {
      nan = nan || std::isnan(item_max[i]);
      m = std::max(m, item_max[i]);
    }
    scores_data[b] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }
  return {maps, scores};
}

}  // namespace

AnomalyMapResult anomaly_map_cpu(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                 double sigma, bool product) {
  return anomaly_map_cpu_impl(teacher, student, out_size, sigma, product);
}

TORCH_LIBRARY_IMPL(mrkd, CPU, m) { m.impl("anomaly_map", &anomaly_map_cpu); }

}  // namespace mrkd
