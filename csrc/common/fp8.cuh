// FP8 (e4m3fn) scaling arithmetic shared by the quantizers and the kernels that quantize on the fly.
// The rules match pykernels/reference/fp8_quant.py bit for bit.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

namespace pykernels {

constexpr float kFp8E4M3Max = 448.0f;
// Groups whose absolute maximum is below this get the scale of this value, so all-zero groups are safe.
constexpr float kFp8AmaxFloor = 1e-4f;

// scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two (UE8M0: exponent-only scales).
// A NaN or infinite amax (the group held one) is returned as it is, with or without UE8M0: fmaxf would
// turn NaN into the floor, and the exponent bump would turn NaN's bits into -0.
__host__ __device__ inline float fp8_scale_from_amax(float amax, bool ue8m0) {
  if (!(amax <= 3.402823466e38f)) return amax;
  float scale = fmaxf(amax, kFp8AmaxFloor) / kFp8E4M3Max;
  if (ue8m0) {
    // Round up to the next power of two: keep the exponent, bump it when any mantissa bit is set.
    // Scales here are >= 1e-4 / 448, far from subnormal, so the exponent field is the whole story.
    uint32_t bits;
    memcpy(&bits, &scale, sizeof(bits));
    if (bits & 0x007fffffu) bits = (bits & 0xff800000u) + 0x00800000u;
    memcpy(&scale, &bits, sizeof(bits));
  }
  return scale;
}

// max(a, b) that, unlike fmaxf, returns NaN when either is NaN (a group's amax must see its NaNs), in one
// instruction as fmaxf is.
__device__ inline float fmax_propagate_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The e4m3fn code of NaN (S.1111.111), stored for every element of a group whose scale is not finite.
constexpr uint8_t kFp8E4M3NaN = 0x7f;

// Two floats, already divided by the scale, to two e4m3fn bytes (round to nearest even, saturating).
__device__ inline uint16_t fp8x2_from_float2(float a, float b) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

}  // namespace pykernels
