// The bias columns of one output tile, staged in shared memory while the mainloop runs (issue 24).
// Loading them from global memory inside the epilogue's per-column loop cost one dependent L2 round trip per
// column group (the `col < n_out` branch around each load kept ptxas from hoisting them), ~5 µs per 128x256 tile.
// Now each math warp copies the tile's kBlockN biases into its own slice of shared memory with 4-byte cp.async
// when the tile starts; the epilogue waits for them (long landed by then) and adds them to the fp32
// accumulators with shared loads, before the activation / routing weight, exactly where the global loads added
// them. One copy per warp, not per CTA: a warp reads only what it wrote, so __syncwarp orders the reuse of the
// slice across tiles and no barrier couples the math warps.
// Tile column c (0 .. kBlockN-1) is the accumulator column of the wgmma layout: GEMM1's first kBlockN/2 are gate,
// the rest the matching up columns; GEMM2's are kBlockN consecutive output columns. Both are two segments of
// kBlockN/2 columns, `seg0` and `seg1` in global memory; columns at or past `valid` of a segment read as zero.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/sm90_ptx.cuh"

namespace staticmoe::moe {

template <typename T, int kBlockN>
struct TileBias {
  static constexpr int kWarpBytes = kBlockN * int(sizeof(T));
  static constexpr int kPairsPerLane = kBlockN / 2 / 32;  // 4-byte pairs each lane copies
  static constexpr int kSegPairs = kBlockN / 4;           // pairs per segment: a multiple of 32, so a copy
  static_assert(sizeof(T) == 2 && kBlockN % 128 == 0);   // instruction never straddles the two segments

  // All lanes of the warp; `slice` is this warp's kWarpBytes. The pointers must be 4-byte aligned (as the
  // 32-bit global loads this replaces needed); `valid0/1` are even (n_out and tile widths are multiples of 8).
  static __device__ __forceinline__ void stage_async(T* slice, const T* seg0, int valid0, const T* seg1, int valid1,
                                                     int lane) {
    __syncwarp();  // every lane has read the previous tile's biases out of the slice
#pragma unroll
    for (int i = 0; i < kPairsPerLane; ++i) {
      const int p = lane + 32 * i;
      const bool second = p >= kSegPairs;
      const int c = 2 * (second ? p - kSegPairs : p);
      const bool ok = c < (second ? valid1 : valid0);
      sm90::cp_async_4(slice + 2 * p, ok ? (second ? seg1 : seg0) + c : seg0, ok);
    }
    sm90::cp_async_commit();
  }

  // acc[j*4 + {0,1,2,3}] (rows r, r, r+8, r+8; columns 8j + 2(lane%4) + {0,1,0,1}) += bias of those columns.
  template <int kAccs>
  static __device__ __forceinline__ void add(float (&acc)[kAccs], const T* slice, int lane) {
    static_assert(kAccs == kBlockN / 2, "one accumulator register per 2 tile columns of 2 rows");
    sm90::cp_async_wait<0>();
    __syncwarp();  // the other lanes' copies have landed
    const uint32_t base = sm90::smem_addr(slice) + 4 * (lane & 3);
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      uint32_t bits;  // volatile: never above the wait
      asm volatile("ld.shared.b32 %0, [%1];" : "=r"(bits) : "r"(base + 16 * j));
      const float2 b = to_float2(bits);
      acc[j * 4 + 0] += b.x, acc[j * 4 + 1] += b.y;
      acc[j * 4 + 2] += b.x, acc[j * 4 + 3] += b.y;
    }
  }

  static __device__ __forceinline__ float2 to_float2(uint32_t bits) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&bits));
    else return __half22float2(*reinterpret_cast<__half2*>(&bits));
  }
};

}  // namespace staticmoe::moe
