#include "static_batch/static_batch.h"
#include "static_batch/task_map_build.cuh"

namespace staticmoe {

__global__ void __launch_bounds__(kTaskMapBuildThreads)
    build_task_map_kernel(const int32_t* tile_counts, int32_t num_tasks, int32_t* tile_prefix, int32_t* slot_task,
                          int32_t* num_slots) {
  task_map_build_block_impl(tile_counts, nullptr, num_tasks, tile_prefix, slot_task, num_slots);
}

cudaError_t build_task_map(const int32_t* tile_counts, int32_t num_tasks, int32_t* tile_prefix, int32_t* slot_task,
                           int32_t* num_slots, cudaStream_t stream) {
  build_task_map_kernel<<<1, kTaskMapBuildThreads, 0, stream>>>(tile_counts, num_tasks, tile_prefix, slot_task,
                                                                 num_slots);
  return cudaGetLastError();
}

}  // namespace staticmoe

namespace staticmoe {

// Test entry: decodes every virtual tile v < num_tiles with the warp decoder (one warp per v).
__global__ void decode_all_kernel(TaskMap map, int32_t num_tiles, int32_t* out) {
  const int32_t v = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (v >= num_tiles) return;  // whole warps exit together
  int32_t hint = 0;
  const TileCoord c = task_map_decode_warp(map, v, *map.num_slots, hint);
  if ((threadIdx.x & 31) == 0) {
    out[3 * v] = c.slot;
    out[3 * v + 1] = c.task;
    out[3 * v + 2] = c.tile;
  }
}

cudaError_t decode_all_tiles(const int32_t* tile_prefix, const int32_t* slot_task, const int32_t* num_slots,
                             int32_t num_tiles, int32_t* out, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  decode_all_kernel<<<(num_tiles + 7) / 8, 256, 0, stream>>>(TaskMap{tile_prefix, slot_task, num_slots}, num_tiles,
                                                            out);
  return cudaGetLastError();
}

}  // namespace staticmoe
