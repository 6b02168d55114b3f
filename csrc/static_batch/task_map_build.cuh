// Block-wide construction of the compressed task map (see task_map.h). Header-only so each kernel that needs it
// (the generic builder, the MoE plan) inlines it.
#pragma once
#include <cub/block/block_scan.cuh>

#include "static_batch/task_map.h"

namespace staticmoe {

constexpr int kTaskMapBuildThreads = 1024;

// Must be called by all kTaskMapBuildThreads threads of the block. Stable: slots follow `order`.
__device__ __forceinline__ void task_map_build_block_impl(const int32_t* tile_counts, const int32_t* order,
                                                          int32_t num_tasks, int32_t* tile_prefix,
                                                          int32_t* slot_task, int32_t* num_slots) {
  using Scan = cub::BlockScan<int2, kTaskMapBuildThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int2 carry;  // (slots so far, tiles so far)
  if (threadIdx.x == 0) carry = make_int2(0, 0);
  __syncthreads();
  for (int32_t base = 0; base < num_tasks; base += kTaskMapBuildThreads) {
    const int32_t i = base + threadIdx.x;
    const int32_t task = i < num_tasks ? (order ? order[i] : i) : -1;
    const int32_t tiles = task >= 0 ? tile_counts[task] : 0;
    const int2 mine = make_int2(tiles > 0 ? 1 : 0, tiles);
    int2 before, chunk_total;
    Scan(scan_storage).ExclusiveScan(mine, before, make_int2(0, 0),
                                     [](int2 a, int2 b) { return make_int2(a.x + b.x, a.y + b.y); }, chunk_total);
    const int2 c = carry;
    if (tiles > 0) {
      const int32_t slot = c.x + before.x;
      tile_prefix[slot] = c.y + before.y + tiles;
      slot_task[slot] = task;
    }
    __syncthreads();  // everyone has read `carry` and scan_storage before they are reused
    if (threadIdx.x == 0) carry = make_int2(c.x + chunk_total.x, c.y + chunk_total.y);
    __syncthreads();
  }
  if (threadIdx.x == 0) *num_slots = carry.x;
}

}  // namespace staticmoe
