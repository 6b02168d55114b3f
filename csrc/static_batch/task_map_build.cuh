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
  using Scan = cub::BlockScan<int32_t, kTaskMapBuildThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int32_t carry_slots, carry_tiles;  // totals of the chunks before this one
  if (threadIdx.x == 0) carry_slots = carry_tiles = 0;
  __syncthreads();
  for (int32_t base = 0; base < num_tasks; base += kTaskMapBuildThreads) {
    const int32_t i = base + threadIdx.x;
    const int32_t task = i < num_tasks ? (order ? order[i] : i) : -1;
    const int32_t tiles = task >= 0 ? tile_counts[task] : 0;
    int32_t slots_before, tiles_before, chunk_slots, chunk_tiles;
    Scan(scan_storage).ExclusiveSum(tiles > 0 ? 1 : 0, slots_before, chunk_slots);
    __syncthreads();  // scan_storage is reused
    Scan(scan_storage).ExclusiveSum(tiles, tiles_before, chunk_tiles);
    const int32_t c_slots = carry_slots, c_tiles = carry_tiles;
    if (tiles > 0) {
      const int32_t slot = c_slots + slots_before;
      tile_prefix[slot] = c_tiles + tiles_before + tiles;
      slot_task[slot] = task;
    }
    __syncthreads();  // everyone has read the carries and scan_storage before they are reused
    if (threadIdx.x == 0) carry_slots = c_slots + chunk_slots, carry_tiles = c_tiles + chunk_tiles;
    __syncthreads();
  }
  if (threadIdx.x == 0) *num_slots = carry_slots;
}

}  // namespace staticmoe
