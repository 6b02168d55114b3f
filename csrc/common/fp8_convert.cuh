// The activation quantisation rule of the FP8 path (model/kernels/fp8.py states it): per group,
// scale = max(amax, kAmaxFloor) / 448 and q = e4m3(v / scale), round to nearest even, saturated to ±448.
// IEEE intrinsics, so the build's fast math does not approximate the rule.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

namespace staticmoe::fp8 {

constexpr float kMax = 448.f;           // largest finite e4m3 magnitude
constexpr float kAmaxFloor = 1e-10f;    // an all-zero group gets a tiny scale (zeros), never 0 or inf

__device__ __forceinline__ float group_scale(float amax) { return __fdiv_rn(fmaxf(amax, kAmaxFloor), kMax); }

__device__ __forceinline__ uint16_t to_e4m3x2(float lo, float hi) {  // lo in the low byte
  return __nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3);
}

// The exact rule (the x quantiser matches the pure-torch reference bit for bit).
__device__ __forceinline__ uint16_t quantize2(float lo, float hi, float scale) {
  return to_e4m3x2(__fdiv_rn(lo, scale), __fdiv_rn(hi, scale));
}

// GEMM1's epilogue multiplies by 1/scale instead of dividing (64 values per thread per tile): the quotient can
// differ by one float32 ulp, which changes an e4m3 rounding only at a near-tie. Its h comes from a fast SiLU
// anyway, so it is not bitwise comparable with the reference's h.
__device__ __forceinline__ uint16_t quantize2_by_inverse(float lo, float hi, float inv_scale) {
  return to_e4m3x2(lo * inv_scale, hi * inv_scale);
}

}  // namespace staticmoe::fp8
