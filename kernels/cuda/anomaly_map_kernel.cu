// CUDA kernel of mrkd::anomaly_map.
// 1. cosine_distance_kernel: every feature map read once (16-byte loads where aligned, float32 accumulation);
//    all scales in one launch, channels split across thread groups when there are few pixels.
// 2. upsample_hblur_kernel: one block per output row: bilinear upsample + sum (or product) over scales +
//    horizontal blur.
// 3. vblur_max_kernel: vertical blur, writes the maps, block max reduction + atomic max per image.
// 4. nan_scores_kernel: NaN score for every image flagged in 1 (a NaN distance: a NaN or infinite feature value) or
//    in 3 (a NaN map value), so no image with a bad feature anywhere gets a finite score.
#include "../anomaly_map.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace mrkd {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxScalesPerLaunch = 8;

// Loads of `Vec` consecutive elements as float; Vec > 1 uses one 16-byte load (caller checks alignment).
template <typename scalar_t, int Vec>
struct Loader;

template <>
struct Loader<float, 1> {
  __device__ static void load(const float* p, float* out) { out[0] = __ldg(p); }
};
template <>
struct Loader<float, 4> {
  __device__ static void load(const float* p, float* out) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};
template <>
struct Loader<c10::Half, 1> {
  __device__ static void load(const c10::Half* p, float* out) {
    out[0] = __half2float(__ldg(reinterpret_cast<const __half*>(p)));
  }
};
template <>
struct Loader<c10::Half, 8> {
  __device__ static void load(const c10::Half* p, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Loader<c10::BFloat16, 1> {
  __device__ static void load(const c10::BFloat16* p, float* out) {
    out[0] = __bfloat162float(__ldg(reinterpret_cast<const __nv_bfloat16*>(p)));
  }
};
template <>
struct Loader<c10::BFloat16, 8> {
  __device__ static void load(const c10::BFloat16* p, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

// One scale of pass 1. NCHW: a block is `lanes` pixel-vectors x `groups` channel groups (reduced in shared
// memory). NHWC: a block is 256 / lanes pixels, `lanes` threads per pixel over its channels (warp shuffles).
struct ScaleDesc {
  const void* teacher;
  const void* student;
  float* dist;
  int* image_nan;  // [B]: set to 1 when a distance of that image is NaN
  int64_t channels;
  int64_t plane;  // H * W
  int64_t units;  // NCHW: batch * plane / vec pixel-vectors; NHWC: batch * plane pixels
  int64_t block_begin;
  int layout;  // detail::FeatureLayout
  int vec;     // elements per load: 1 or 16 bytes' worth
  int lanes;
};

struct ScaleBatch {
  ScaleDesc scale[kMaxScalesPerLaunch];
  int count;
};

__device__ __forceinline__ float cosine_distance(float dot, float tt, float ss) {
  const float eps = static_cast<float>(kCosineEps);
  return 1.0f - dot / (fmaxf(sqrtf(tt), eps) * fmaxf(sqrtf(ss), eps));
}

// Stores the distance of flat pixel `index` (image-major: index / plane is the image) and flags a NaN.
__device__ __forceinline__ void store_distance(const ScaleDesc& d, int64_t index, float value) {
  d.dist[index] = value;
  if (isnan(value)) d.image_nan[index / d.plane] = 1;  // every writer stores the same value: no atomic needed
}

// `partial` holds 3 * kThreads * Vec floats (the channel groups' partial sums).
template <typename scalar_t, int Vec>
__device__ void cosine_nchw(const ScaleDesc& d, int64_t block, float* partial) {
  const int lanes = d.lanes;
  const int groups = kThreads / lanes;
  const int lane = threadIdx.x % lanes;
  const int group = threadIdx.x / lanes;
  const int64_t unit = block * lanes + lane;
  const int64_t vectors_per_image = d.plane / Vec;
  float dot[Vec], tt[Vec], ss[Vec];
#pragma unroll
  for (int v = 0; v < Vec; ++v) dot[v] = tt[v] = ss[v] = 0.0f;
  if (unit < d.units) {
    const int64_t b = unit / vectors_per_image;
    const int64_t p = (unit % vectors_per_image) * Vec;
    const scalar_t* t = static_cast<const scalar_t*>(d.teacher) + b * d.channels * d.plane + p;
    const scalar_t* s = static_cast<const scalar_t*>(d.student) + b * d.channels * d.plane + p;
    int64_t c = group;
    // Four channels per step keep eight 16-byte loads in flight per thread.
    for (; c + 3 * groups < d.channels; c += 4 * groups) {
      float a[4][Vec], e[4][Vec];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        Loader<scalar_t, Vec>::load(t + (c + u * groups) * d.plane, a[u]);
        Loader<scalar_t, Vec>::load(s + (c + u * groups) * d.plane, e[u]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < Vec; ++v) {
          dot[v] = fmaf(a[u][v], e[u][v], dot[v]);
          tt[v] = fmaf(a[u][v], a[u][v], tt[v]);
          ss[v] = fmaf(e[u][v], e[u][v], ss[v]);
        }
      }
    }
    for (; c < d.channels; c += groups) {
      float a[Vec], e[Vec];
      Loader<scalar_t, Vec>::load(t + c * d.plane, a);
      Loader<scalar_t, Vec>::load(s + c * d.plane, e);
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        dot[v] = fmaf(a[v], e[v], dot[v]);
        tt[v] = fmaf(a[v], a[v], tt[v]);
        ss[v] = fmaf(e[v], e[v], ss[v]);
      }
    }
  }
  if (groups == 1) {
    if (unit < d.units) {
#pragma unroll
      for (int v = 0; v < Vec; ++v) store_distance(d, unit * Vec + v, cosine_distance(dot[v], tt[v], ss[v]));
    }
    return;
  }
#pragma unroll
  for (int v = 0; v < Vec; ++v) {
    partial[threadIdx.x * Vec + v] = dot[v];
    partial[(kThreads + threadIdx.x) * Vec + v] = tt[v];
    partial[(2 * kThreads + threadIdx.x) * Vec + v] = ss[v];
  }
  __syncthreads();
  // The first `lanes * Vec` threads each finish one pixel: sum the groups' partials in a fixed order.
  const int pixels = lanes * Vec;
  for (int q = threadIdx.x; q < pixels; q += kThreads) {
    const int q_lane = q / Vec, v = q % Vec;
    const int64_t q_unit = block * lanes + q_lane;
    if (q_unit >= d.units) continue;
    float sd = 0.0f, st = 0.0f, sss = 0.0f;
    for (int g = 0; g < groups; ++g) {
      const int idx = (g * lanes + q_lane) * Vec + v;
      sd += partial[idx];
      st += partial[kThreads * Vec + idx];
      sss += partial[2 * kThreads * Vec + idx];
    }
    store_distance(d, q_unit * Vec + v, cosine_distance(sd, st, sss));
  }
}

template <typename scalar_t, int Vec>
__device__ void cosine_nhwc(const ScaleDesc& d, int64_t block) {
  const int lanes = d.lanes;
  const int lane = threadIdx.x % lanes;
  const int64_t pixel = block * (kThreads / lanes) + threadIdx.x / lanes;
  float dot = 0.0f, tt = 0.0f, ss = 0.0f;
  if (pixel < d.units) {
    const scalar_t* t = static_cast<const scalar_t*>(d.teacher) + pixel * d.channels;
    const scalar_t* s = static_cast<const scalar_t*>(d.student) + pixel * d.channels;
    for (int64_t c = static_cast<int64_t>(lane) * Vec; c < d.channels; c += static_cast<int64_t>(lanes) * Vec) {
      float a[Vec], e[Vec];
      Loader<scalar_t, Vec>::load(t + c, a);
      Loader<scalar_t, Vec>::load(s + c, e);
#pragma unroll
      for (int v = 0; v < Vec; ++v) {
        dot = fmaf(a[v], e[v], dot);
        tt = fmaf(a[v], a[v], tt);
        ss = fmaf(e[v], e[v], ss);
      }
    }
  }
  // Every thread of the warp reaches the shuffles (lanes divides 32, groups are warp-aligned).
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset, lanes);
    tt += __shfl_xor_sync(0xffffffffu, tt, offset, lanes);
    ss += __shfl_xor_sync(0xffffffffu, ss, offset, lanes);
  }
  if (lane == 0 && pixel < d.units) store_distance(d, pixel, cosine_distance(dot, tt, ss));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cosine_distance_kernel(const ScaleBatch batch) {
  int k = 0;
  while (k + 1 < batch.count && static_cast<int64_t>(blockIdx.x) >= batch.scale[k + 1].block_begin) ++k;
  const ScaleDesc& d = batch.scale[k];
  const int64_t block = static_cast<int64_t>(blockIdx.x) - d.block_begin;
  constexpr int kWide = 16 / sizeof(scalar_t);
  __shared__ float partial[3 * kThreads * kWide];
  if (d.layout == static_cast<int>(detail::FeatureLayout::kNCHW)) {
    if (d.vec == kWide) {
      cosine_nchw<scalar_t, kWide>(d, block, partial);
    } else {
      cosine_nchw<scalar_t, 1>(d, block, partial);
    }
  } else {
    if (d.vec == kWide) {
      cosine_nhwc<scalar_t, kWide>(d, block);
    } else {
      cosine_nhwc<scalar_t, 1>(d, block);
    }
  }
}

// Normalised Gaussian taps into shared memory (double like scipy); every thread of the block must call it.
__device__ void load_gaussian_weights(float* weights, double* scratch, int radius, double sigma) {
  const int taps = 2 * radius + 1;
  for (int i = threadIdx.x + threadIdx.y * blockDim.x; i < taps; i += blockDim.x * blockDim.y) {
    const double x = static_cast<double>(i - radius);
    scratch[i] = radius == 0 ? 1.0 : exp(-0.5 / (sigma * sigma) * x * x);
  }
  __syncthreads();
  __shared__ double total;
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    double sum = 0.0;
    for (int i = 0; i < taps; ++i) sum += scratch[i];
    total = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x + threadIdx.y * blockDim.x; i < taps; i += blockDim.x * blockDim.y) {
    weights[i] = static_cast<float>(scratch[i] / total);
  }
  __syncthreads();
}

__device__ __forceinline__ int reflect(int i, int n) {
  if (i >= 0 && i < n) return i;
  const int period = 2 * n;
  int m = i % period;
  if (m < 0) m += period;
  return m < n ? m : period - 1 - m;
}

struct SourceMap {
  const float* dist;  // [B, H, W] cosine distances of one scale
  int height, width;
  float scale_y, scale_x;  // align_corners=True source step per output pixel
};

struct SourceMaps {
  SourceMap map[kMaxScalesPerLaunch];
  int count;
};

__device__ __forceinline__ void bilinear_tap(float scale, int o, int in, int& lo, int& hi, float& frac) {
  const float src = scale * static_cast<float>(o);
  lo = min(static_cast<int>(src), in - 1);
  hi = lo + (lo < in - 1 ? 1 : 0);
  frac = src - static_cast<float>(lo);
}

// grid (out_h, B), block kThreads. `accumulate` adds (`product`: multiplies) this launch's scales to what is
// already in `summed` (more than kMaxScalesPerLaunch scales take several launches; the last one blurs).
__global__ void __launch_bounds__(kThreads)
    upsample_hblur_kernel(const SourceMaps sources, float* summed, float* horizontal, int out_h, int out_w,
                          int radius, double sigma, bool accumulate, bool blur, bool product) {
  extern __shared__ unsigned char smem_raw[];
  double* scratch = reinterpret_cast<double*>(smem_raw);
  float* weights = reinterpret_cast<float*>(scratch + (2 * radius + 1));
  float* padded = weights + (2 * radius + 1);  // out_w + 2 * radius
  float* source_rows = padded + out_w + 2 * radius;
  const int y = blockIdx.x;
  const int b = blockIdx.y;
  if (blur) load_gaussian_weights(weights, scratch, radius, sigma);

  // Vertically interpolated source rows of every scale.
  int offset = 0;
  for (int k = 0; k < sources.count; ++k) {
    const SourceMap& src = sources.map[k];
    int lo, hi;
    float frac;
    bilinear_tap(src.scale_y, y, src.height, lo, hi, frac);
    const float* image = src.dist + static_cast<int64_t>(b) * src.height * src.width;
    for (int x = threadIdx.x; x < src.width; x += kThreads) {
      source_rows[offset + x] = (1.0f - frac) * image[lo * src.width + x] + frac * image[hi * src.width + x];
    }
    offset += src.width;
  }
  __syncthreads();
  float* summed_row = summed + (static_cast<int64_t>(b) * out_h + y) * out_w;
  for (int x = threadIdx.x; x < out_w; x += kThreads) {
    float value = accumulate ? summed_row[x] : (product ? 1.0f : 0.0f);
    int row_offset = 0;
    for (int k = 0; k < sources.count; ++k) {
      const SourceMap& src = sources.map[k];
      int lo, hi;
      float frac;
      bilinear_tap(src.scale_x, x, src.width, lo, hi, frac);
      const float distance = (1.0f - frac) * source_rows[row_offset + lo] + frac * source_rows[row_offset + hi];
      value = product ? value * distance : value + distance;
      row_offset += src.width;
    }
    padded[radius + x] = value;
    if (!blur) summed_row[x] = value;
  }
  if (!blur) return;
  __syncthreads();
  for (int j = threadIdx.x; j < 2 * radius; j += kThreads) {
    const int position = j < radius ? j - radius : out_w + (j - radius);
    padded[position + radius] = padded[reflect(position, out_w) + radius];
  }
  __syncthreads();
  float* out_row = horizontal + (static_cast<int64_t>(b) * out_h + y) * out_w;
  const int taps = 2 * radius + 1;
  for (int x = threadIdx.x; x < out_w; x += kThreads) {
    float acc = 0.0f;
    for (int k = 0; k < taps; ++k) acc = fmaf(weights[k], padded[x + k], acc);
    out_row[x] = acc;
  }
}

// Max of non-NaN floats through integer atomics: floats with the sign bit clear order as signed ints, those with
// it set (-0.0 included) order reversed as unsigned ints. The sign bit, not `value >= 0`, picks the path: -0.0 >= 0
// is true, and -0.0 as a signed int is INT_MIN, which would never replace anything.
__device__ __forceinline__ void atomic_max_float(float* address, float value) {
  if (!signbit(value)) {
    atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
  } else {
    atomicMin(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
  }
}

constexpr int kVblurCols = 32;
constexpr int kVblurThreadRows = 8;
constexpr int kVblurRowsPerThread = 8;

constexpr int kVblurRowsPerBlock = kVblurThreadRows * kVblurRowsPerThread;
constexpr int64_t kMaxGridY = 65535;

// grid (ceil(W / 32), ceil(H / 64), B), block (32, 8). A NaN map value flags its image in `image_nan` (fmaxf skips
// NaN, so the max alone would not show it).
__global__ void __launch_bounds__(kVblurCols* kVblurThreadRows)
    vblur_max_kernel(const float* horizontal, float* maps, float* scores, int* image_nan, int out_h, int out_w,
                     int radius, double sigma) {
  extern __shared__ unsigned char smem_raw[];
  double* scratch = reinterpret_cast<double*>(smem_raw);
  float* weights = reinterpret_cast<float*>(scratch + (2 * radius + 1));
  __shared__ float warp_max[kVblurThreadRows];
  load_gaussian_weights(weights, scratch, radius, sigma);
  const int b = blockIdx.z;
  const int x = blockIdx.x * kVblurCols + threadIdx.x;
  const int taps = 2 * radius + 1;
  const float* image = horizontal + static_cast<int64_t>(b) * out_h * out_w;
  float local_max = -INFINITY;
  bool local_nan = false;
  if (x < out_w) {
    const int y_begin = blockIdx.y * kVblurRowsPerBlock;
    for (int r = 0; r < kVblurRowsPerThread; ++r) {
      const int y = y_begin + r * kVblurThreadRows + threadIdx.y;
      if (y >= out_h) break;
      float acc = 0.0f;
      for (int k = 0; k < taps; ++k) {
        acc = fmaf(weights[k], image[static_cast<int64_t>(reflect(y - radius + k, out_h)) * out_w + x], acc);
      }
      maps[(static_cast<int64_t>(b) * out_h + y) * out_w + x] = acc;
      local_max = fmaxf(local_max, acc);
      local_nan = local_nan || isnan(acc);
    }
  }
  if (local_nan) image_nan[b] = 1;
  for (int offset = 16; offset > 0; offset /= 2) {
    local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  }
  if (threadIdx.x == 0) warp_max[threadIdx.y] = local_max;
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    float m = warp_max[0];
    for (int i = 1; i < kVblurThreadRows; ++i) m = fmaxf(m, warp_max[i]);
    if (m > -INFINITY) atomic_max_float(scores + b, m);
  }
}

// grid ceil(B / 256), block 256: the flagged images' scores become NaN.
__global__ void nan_scores_kernel(float* scores, const int* image_nan, int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < batch && image_nan[b] != 0) scores[b] = __int_as_float(0x7fc00000);  // quiet NaN
}

struct DeviceLimits {
  int64_t max_resident_threads;
  size_t shared_memory_optin;
};

DeviceLimits device_limits(int device) {
  int sms = 0, threads_per_sm = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return {static_cast<int64_t>(sms) * threads_per_sm, static_cast<size_t>(smem_optin)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

ScaleDesc describe_scale(const detail::ScaleFeatures& f, float* dist, int* image_nan, int64_t target_threads) {
  const at::Tensor& t = f.teacher;
  ScaleDesc d{};
  d.teacher = t.const_data_ptr();
  d.student = f.student.const_data_ptr();
  d.dist = dist;
  d.image_nan = image_nan;
  d.channels = t.size(1);
  d.plane = t.size(2) * t.size(3);
  d.layout = static_cast<int>(f.layout);
  const int64_t batch = t.size(0);
  const int wide = 16 / static_cast<int>(t.element_size());
  const bool pointers_aligned = aligned16(d.teacher) && aligned16(d.student);
  if (f.layout == detail::FeatureLayout::kNCHW) {
    d.vec = pointers_aligned && d.plane % wide == 0 ? wide : 1;
    d.units = batch * d.plane / d.vec;
    // Split channels over more groups until the grid fills the GPU (few pixels, many channels).
    int groups = 1;
    while (groups < 32 && groups * 2 <= d.channels &&
           ((d.units + kThreads / groups - 1) / (kThreads / groups)) * kThreads < target_threads) {
      groups *= 2;
    }
    d.lanes = kThreads / groups;
  } else {
    d.vec = pointers_aligned && d.channels % wide == 0 ? wide : 1;
    d.units = batch * d.plane;
    d.lanes = pow2_at_least((d.channels + d.vec - 1) / d.vec, 32);
  }
  return d;
}

int64_t blocks_for(const ScaleDesc& d) {
  const int64_t per_block = d.layout == static_cast<int>(detail::FeatureLayout::kNCHW) ? d.lanes : kThreads / d.lanes;
  return (d.units + per_block - 1) / per_block;
}

AnomalyMapResult anomaly_map_cuda_impl(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                       double sigma, bool product) {
  detail::check_anomaly_map_inputs(teacher, student, out_size, sigma, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(teacher[0].device());
  const int64_t batch = teacher[0].size(0);
  const int64_t out_h = out_size[0], out_w = out_size[1];
  // Grid limits, as errors that say which size is too large (a launch past them fails with a cryptic
  // "invalid configuration argument"). The radius is already at most kMaxBlurRadius (check_anomaly_map_inputs).
  TORCH_CHECK(batch <= kMaxGridY, "anomaly_map: batch ", batch, " is larger than the CUDA kernel's grid allows (at most ",
              kMaxGridY, " images per call)");
  TORCH_CHECK(out_w <= std::numeric_limits<int>::max() / 2, "anomaly_map: out_size width ", out_w,
              " is too large for the CUDA kernel (at most ", std::numeric_limits<int>::max() / 2, ")");
  TORCH_CHECK((out_h + kVblurRowsPerBlock - 1) / kVblurRowsPerBlock <= kMaxGridY, "anomaly_map: out_size height ",
              out_h, " needs ", (out_h + kVblurRowsPerBlock - 1) / kVblurRowsPerBlock,
              " blocks of the vertical-blur grid, more than ", kMaxGridY, " (height at most ",
              kMaxGridY * kVblurRowsPerBlock, ")");
  // Only c10/cuda and the runtime API: ATen/cuda/CUDAContext.h would need the cuSPARSE/cuBLAS headers.
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DeviceLimits limits = device_limits(teacher[0].device().index());
  const int64_t target_threads = limits.max_resident_threads;

  std::vector<detail::ScaleFeatures> features;
  std::vector<int64_t> dist_offsets;
  int64_t dist_total = 0;
  for (size_t k = 0; k < teacher.size(); ++k) {
    features.push_back(detail::normalize_layout(teacher[k], student[k]));
    dist_offsets.push_back(dist_total);
    dist_total += batch * teacher[k].size(2) * teacher[k].size(3);
  }
  const auto float_options = teacher[0].options().dtype(at::kFloat);
  at::Tensor dist = at::empty({dist_total}, float_options);
  float* dist_data = dist.data_ptr<float>();
  at::Tensor image_nan = at::zeros({batch}, teacher[0].options().dtype(at::kInt));
  int* image_nan_data = image_nan.data_ptr<int>();

  // Pass 1: cosine distances, up to kMaxScalesPerLaunch scales per launch.
  for (size_t first = 0; first < features.size(); first += kMaxScalesPerLaunch) {
    ScaleBatch scale_batch{};
    int64_t blocks = 0;
    for (size_t k = first; k < std::min(features.size(), first + kMaxScalesPerLaunch); ++k) {
      ScaleDesc d = describe_scale(features[k], dist_data + dist_offsets[k], image_nan_data, target_threads);
      d.block_begin = blocks;
      blocks += blocks_for(d);
      scale_batch.scale[scale_batch.count++] = d;
    }
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "anomaly_map: feature maps too large");
    switch (teacher[0].scalar_type()) {
      case at::kFloat:
        cosine_distance_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scale_batch);
        break;
      case at::kHalf:
        cosine_distance_kernel<c10::Half><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scale_batch);
        break;
      case at::kBFloat16:
        cosine_distance_kernel<c10::BFloat16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scale_batch);
        break;
      default:
        TORCH_CHECK(false, "anomaly_map: unsupported dtype ", teacher[0].scalar_type());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Pass 2: upsample + sum or product (+ horizontal blur in the launch that adds the last scales).
  const int radius = static_cast<int>(detail::gaussian_radius(sigma));
  // Partial sums only when the scales need more than one launch.
  at::Tensor summed = features.size() > kMaxScalesPerLaunch ? at::empty({batch, out_h, out_w}, float_options)
                                                             : at::Tensor();
  float* summed_data = summed.defined() ? summed.data_ptr<float>() : nullptr;
  at::Tensor horizontal = at::empty({batch, out_h, out_w}, float_options);
  int64_t max_source_widths = 0;
  for (size_t first = 0; first < features.size(); first += kMaxScalesPerLaunch) {
    int64_t widths = 0;
    for (size_t k = first; k < std::min(features.size(), first + kMaxScalesPerLaunch); ++k) {
      widths += teacher[k].size(3);
    }
    max_source_widths = std::max(max_source_widths, widths);
  }
  const size_t hblur_smem = (2 * radius + 1) * (sizeof(double) + sizeof(float)) +
                            (out_w + 2 * radius + max_source_widths) * sizeof(float);
  TORCH_CHECK(hblur_smem <= limits.shared_memory_optin, "anomaly_map: out_size width ", out_w, " and sigma ",
              sigma, " need ", hblur_smem, " bytes of shared memory, more than the device's ",
              limits.shared_memory_optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(upsample_hblur_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(hblur_smem)));
  for (size_t first = 0; first < features.size(); first += kMaxScalesPerLaunch) {
    SourceMaps sources{};
    const size_t last = std::min(features.size(), first + kMaxScalesPerLaunch);
    for (size_t k = first; k < last; ++k) {
      const int in_h = static_cast<int>(teacher[k].size(2)), in_w = static_cast<int>(teacher[k].size(3));
      SourceMap& m = sources.map[sources.count++];
      m.dist = dist_data + dist_offsets[k];
      m.height = in_h;
      m.width = in_w;
      m.scale_y = out_h > 1 ? static_cast<float>(in_h - 1) / static_cast<float>(out_h - 1) : 0.0f;
      m.scale_x = out_w > 1 ? static_cast<float>(in_w - 1) / static_cast<float>(out_w - 1) : 0.0f;
    }
    const dim3 grid(static_cast<unsigned>(out_h), static_cast<unsigned>(batch));
    upsample_hblur_kernel<<<grid, kThreads, hblur_smem, stream>>>(
        sources, summed_data, horizontal.data_ptr<float>(), static_cast<int>(out_h),
        static_cast<int>(out_w), radius, sigma, first > 0, last == features.size(), product);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Pass 3: vertical blur + max.
  at::Tensor maps = at::empty({batch, 1, out_h, out_w}, float_options);
  at::Tensor scores = at::full({batch}, -std::numeric_limits<float>::infinity(), float_options);
  const size_t vblur_smem = (2 * radius + 1) * (sizeof(double) + sizeof(float));
  TORCH_CHECK(vblur_smem <= limits.shared_memory_optin, "anomaly_map: sigma ", sigma, " is too large");
  C10_CUDA_CHECK(cudaFuncSetAttribute(vblur_max_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(vblur_smem)));
  const dim3 grid(static_cast<unsigned>((out_w + kVblurCols - 1) / kVblurCols),
                  static_cast<unsigned>((out_h + kVblurRowsPerBlock - 1) / kVblurRowsPerBlock),
                  static_cast<unsigned>(batch));
  vblur_max_kernel<<<grid, dim3(kVblurCols, kVblurThreadRows), vblur_smem, stream>>>(
      horizontal.data_ptr<float>(), maps.data_ptr<float>(), scores.data_ptr<float>(), image_nan_data,
      static_cast<int>(out_h), static_cast<int>(out_w), radius, sigma);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Pass 4: NaN scores for the images flagged in passes 1 and 3.
  nan_scores_kernel<<<static_cast<unsigned>((batch + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      scores.data_ptr<float>(), image_nan_data, batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {maps, scores};
}

}  // namespace

AnomalyMapResult anomaly_map_cuda(at::TensorList teacher, at::TensorList student, at::IntArrayRef out_size,
                                  double sigma, bool product) {
  return anomaly_map_cuda_impl(teacher, student, out_size, sigma, product);
}

TORCH_LIBRARY_IMPL(mrkd, CUDA, m) { m.impl("anomaly_map", &anomaly_map_cuda); }

}  // namespace mrkd
