// FP8 quantizer kernels. Memory-bound: what matters is 16-byte loads, enough bytes in flight, and a
// reduction that never leaves the warp (per-token groups) or the CTA (128x128 weight blocks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/fp8.cuh"
#include "fp8_quant/fp8_quant.h"

namespace pykernels {
namespace fp8_quant {

constexpr int kThreads = 256;

template <typename T>
__device__ inline float to_float(T v);
template <>
__device__ inline float to_float<float>(float v) { return v; }
template <>
__device__ inline float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ inline float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// VEC elements moved as one load: 16 bytes when VEC * sizeof(T) == 16.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// VEC fp8 bytes moved as one store.
template <int VEC>
struct alignas(VEC) Fp8Vec {
  uint8_t v[VEC];
};

template <typename T, int VEC>
__device__ inline void load_as_float(const T* src, float (&dst)[VEC]) {
  Vec<T, VEC> chunk = *reinterpret_cast<const Vec<T, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(chunk.v[i]);
}

// A group whose scale is not finite held a NaN or an infinity: every code of it is NaN, so that the
// dequantized group is NaN whatever the scale (an infinite scale would turn finite codes into zeros).
template <int VEC>
__device__ inline void quantize_store(const float (&vals)[VEC], float scale, uint8_t* dst) {
  static_assert(VEC % 2 == 0 || VEC == 1, "fp8 pairs need an even vector width");
  Fp8Vec<VEC> out;
  if (!isfinite(scale)) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.v[i] = kFp8E4M3NaN;
  } else if constexpr (VEC == 1) {
    out.v[0] = static_cast<uint8_t>(fp8x2_from_float2(__fdiv_rn(vals[0], scale), 0.0f) & 0xff);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      // Division, not multiplication by 1/scale: the reference divides, and the two differ in the last bit.
      uint16_t pair = fp8x2_from_float2(__fdiv_rn(vals[i], scale), __fdiv_rn(vals[i + 1], scale));
      out.v[i] = static_cast<uint8_t>(pair & 0xff);
      out.v[i + 1] = static_cast<uint8_t>(pair >> 8);
    }
  }
  *reinterpret_cast<Fp8Vec<VEC>*>(dst) = out;
}

template <int VEC>
__device__ inline float abs_max(const float (&vals)[VEC]) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) m = fmax_propagate_nan(m, fabsf(vals[i]));
  return m;
}

// The amax of a group spread over `lanes` adjacent lanes (a power of two <= 32, aligned to it), NaN when
// any lane's is: the butterfly leaves the group's value in each of its lanes. Every lane of the warp must
// make the call.
__device__ inline float lanes_amax(float amax, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    amax = fmax_propagate_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  return amax;
}

// One group of `group_size` consecutive elements of a row is owned by `lanes_per_group` adjacent lanes
// (a power of two <= 32, so a group never straddles warps); each lane handles chunks of VEC elements
// strided by lanes_per_group. With SINGLE_CHUNK every lane owns exactly one chunk and keeps it in
// registers between the reduction and the store; otherwise the group is read twice (the second read
// hits L1). VEC > 1 requires K and group_size to be multiples of VEC, so a chunk is either entirely
// inside the row or entirely past its end.
template <typename T, int VEC, bool SINGLE_CHUNK>
__global__ void __launch_bounds__(kThreads) per_token_group_quant_fp8_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales, TokenGroupScaleLayout scale_layout,
    int64_t num_rows, int64_t k, int group_size, int groups_per_row, int lanes_per_group, bool ue8m0) {
  const int lane = threadIdx.x % 32;
  const int segment = lane / lanes_per_group;  // which of the warp's groups this lane works on
  const int lane_in_group = lane % lanes_per_group;
  const int groups_per_warp = 32 / lanes_per_group;
  const int chunks_per_group = group_size / VEC;
  const int64_t total_groups = num_rows * groups_per_row;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kThreads / 32;

  // The loop bound is uniform across the warp, so every lane reaches every shuffle.
  for (int64_t base = warp_id * groups_per_warp; base < total_groups; base += num_warps * groups_per_warp) {
    const int64_t group = base + segment;
    const bool valid = group < total_groups;
    const int64_t row = valid ? group / groups_per_row : 0;
    const int64_t col0 = valid ? static_cast<int64_t>(group % groups_per_row) * group_size : k;
    const T* src = x + row * k;
    uint8_t* dst = q + row * k;

    float amax = 0.0f;
    float vals[VEC];
    if constexpr (SINGLE_CHUNK) {
      const int64_t col = col0 + static_cast<int64_t>(lane_in_group) * VEC;
      const bool in_row = col < k && lane_in_group < chunks_per_group;
      if (in_row) {
        load_as_float<T, VEC>(src + col, vals);
        amax = abs_max(vals);
      }
    } else {
      for (int c = lane_in_group; c < chunks_per_group; c += lanes_per_group) {
        const int64_t col = col0 + static_cast<int64_t>(c) * VEC;
        if (col >= k) break;
        load_as_float<T, VEC>(src + col, vals);
        amax = fmax_propagate_nan(amax, abs_max(vals));
      }
    }
    amax = lanes_amax(amax, lanes_per_group);
    const float scale = fp8_scale_from_amax(amax, ue8m0);
    if (!valid) continue;
    if (lane_in_group == 0) scales[scale_layout.offset(row, group - row * groups_per_row)] = scale;

    if constexpr (SINGLE_CHUNK) {
      const int64_t col = col0 + static_cast<int64_t>(lane_in_group) * VEC;
      if (col < k && lane_in_group < chunks_per_group) quantize_store<VEC>(vals, scale, dst + col);
    } else {
      for (int c = lane_in_group; c < chunks_per_group; c += lanes_per_group) {
        const int64_t col = col0 + static_cast<int64_t>(c) * VEC;
        if (col >= k) break;
        load_as_float<T, VEC>(src + col, vals);
        quantize_store<VEC>(vals, scale, dst + col);
      }
    }
  }
}

// One CTA per block_size x block_size weight block (blockIdx.x: K block, .y: N block, .z: group).
// Threads sweep the block row by row in chunks of VEC; the amax is reduced through the warps and
// shared memory, then the block is read again (from L1/L2) to quantize.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) per_block_quant_fp8_kernel(
    const T* __restrict__ w, uint8_t* __restrict__ q, float* __restrict__ scales, int64_t n, int64_t k,
    int block_size, bool ue8m0) {
  __shared__ float warp_amax[kThreads / 32];
  __shared__ float block_scale;
  const int64_t kb = blockIdx.x, nb = blockIdx.y, g = blockIdx.z;
  const int64_t num_kb = gridDim.x, num_nb = gridDim.y;
  const int64_t row0 = nb * block_size, col0 = kb * block_size;
  const int rows = static_cast<int>(n - row0 < block_size ? n - row0 : block_size);
  const int cols = static_cast<int>(k - col0 < block_size ? k - col0 : block_size);
  const int chunks_per_row = (cols + VEC - 1) / VEC;  // cols is a multiple of VEC when VEC > 1
  const int chunks = rows * chunks_per_row;
  const T* src = w + (g * n + row0) * k + col0;
  uint8_t* dst = q + (g * n + row0) * k + col0;

  float amax = 0.0f;
  float vals[VEC];
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const int r = c / chunks_per_row, cc = (c % chunks_per_row) * VEC;
    load_as_float<T, VEC>(src + static_cast<int64_t>(r) * k + cc, vals);
    amax = fmax_propagate_nan(amax, abs_max(vals));
  }
  amax = lanes_amax(amax, 32);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) m = fmax_propagate_nan(m, warp_amax[i]);
    block_scale = fp8_scale_from_amax(m, ue8m0);
    scales[(g * num_nb + nb) * num_kb + kb] = block_scale;
  }
  __syncthreads();
  const float scale = block_scale;
  for (int c = threadIdx.x; c < chunks; c += kThreads) {
    const int r = c / chunks_per_row, cc = (c % chunks_per_row) * VEC;
    load_as_float<T, VEC>(src + static_cast<int64_t>(r) * k + cc, vals);
    quantize_store<VEC>(vals, scale, dst + static_cast<int64_t>(r) * k + cc);
  }
}

}  // namespace fp8_quant
}  // namespace pykernels
