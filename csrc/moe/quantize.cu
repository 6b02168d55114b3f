// One warp per (row, 128-column group): each lane loads 4 bf16 (8 bytes), the warp reduces the amax with shuffles,
// each lane writes its 4 e4m3 bytes and lane 0 the group's scale.
#include "common/fp8_convert.cuh"
#include "common/pdl_launch.cuh"
#include "moe/moe.h"
#include "moe/quantize.h"

namespace staticmoe::moe {
namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    quantize_rows_kernel(const __nv_bfloat16* x, int64_t groups, uint8_t* q, float* scale) {
  // x was written before the plan that launched us started; the plan's own outputs are not read here. The wait
  // at the end makes the next kernel's wait cover the plan too (PDL waits are on the direct predecessor only).
  allow_dependents();
  const int64_t group = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (group < groups) {
    const int64_t offset = group * kFP8Block + lane * 4;  // rows are contiguous: group g covers [128 g, 128 g + 128)
    const uint2 raw = *reinterpret_cast<const uint2*>(x + offset);
    const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(pair[0]), b = __bfloat1622float2(pair[1]);
    float amax = fmaxf(fmaxf(fabsf(a.x), fabsf(a.y)), fmaxf(fabsf(b.x), fabsf(b.y)));
#pragma unroll
    for (int d = 16; d > 0; d /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    const float s = fp8::group_scale(amax);
    const uint32_t bytes = uint32_t(fp8::quantize2(a.x, a.y, s)) | uint32_t(fp8::quantize2(b.x, b.y, s)) << 16;
    *reinterpret_cast<uint32_t*>(q + offset) = bytes;
    if (lane == 0) scale[group] = s;  // [row, group] row-major: the same index as the group
  }
  wait_for_predecessor();
}

}  // namespace

cudaError_t quantize_rows_fp8(const __nv_bfloat16* x, int32_t rows, int32_t cols, uint8_t* q, float* scale,
                              cudaStream_t stream) {
  if (rows < 0 || cols % kFP8Block) return cudaErrorInvalidValue;
  const int64_t groups = int64_t(rows) * (cols / kFP8Block);
  if (groups == 0) return cudaSuccess;
  const unsigned grid = unsigned((groups + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return launch_with_pdl(quantize_rows_kernel, grid, kWarpsPerBlock * 32, 0, stream, x, groups, q, scale);
}

}  // namespace staticmoe::moe
