// The compressed task map of static batching (arXiv 2501.16103): instead of one record per tile, keep
// `tile_prefix[s]`, the inclusive running tile count over the non-empty tasks (slots), and `slot_task[s]`, the real
// task id of slot s. A virtual tile index v belongs to the slot s with tile_prefix[s-1] <= v < tile_prefix[s], i.e.
// s = #{slots whose prefix is <= v}; a warp counts that 32 prefixes at a time with ballot + popc.
//
// This header is shared by the device decoder and its host twin (unit-tested on the CPU); no torch, no Python.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define SB_HOST_DEVICE __host__ __device__
#else
#define SB_HOST_DEVICE
#endif

namespace staticmoe {

struct TaskMap {
  const int32_t* tile_prefix;  // [max_slots] inclusive prefix of tiles over non-empty tasks
  const int32_t* slot_task;    // [max_slots] real task id of each slot
  const int32_t* num_slots;    // [1] number of non-empty tasks (lives on the device: no host sync to build it)
};

struct TileCoord {
  int32_t slot;  // index among non-empty tasks
  int32_t task;  // real task id
  int32_t tile;  // tile index inside the task
};

SB_HOST_DEVICE inline int32_t task_map_total_tiles(const int32_t* tile_prefix, int32_t num_slots) {
  return num_slots > 0 ? tile_prefix[num_slots - 1] : 0;
}

// Host twin of the warp decoder below: the same 32-wide chunks, the ballot emulated lane by lane.
inline TileCoord task_map_decode_host(const int32_t* tile_prefix, const int32_t* slot_task, int32_t num_slots,
                                      int32_t v, int32_t first_chunk = 0) {
  for (int32_t base = first_chunk * 32; base < num_slots; base += 32) {
    uint32_t ballot = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const int32_t s = base + lane;
      const bool at_or_below = s < num_slots && tile_prefix[s] <= v;
      ballot |= uint32_t(at_or_below) << lane;
    }
    const int32_t below = __builtin_popcount(ballot);
    if (below < 32) {
      const int32_t slot = base + below;
      if (slot >= num_slots) break;  // v is past the last tile
      const int32_t start = slot > 0 ? tile_prefix[slot - 1] : 0;
      return {slot, slot_task[slot], v - start};
    }
  }
  return {-1, -1, -1};  // v >= total tiles
}

#ifdef __CUDACC__
// Called by all 32 lanes of a warp with the same v; every lane gets the same result. `chunk_hint` lets a
// persistent CTA, whose v only grows, resume at the 32-slot chunk where its previous tile was found.
__device__ __forceinline__ TileCoord task_map_decode_warp(const TaskMap& map, int32_t v, int32_t num_slots,
                                                          int32_t& chunk_hint) {
  const int lane = threadIdx.x & 31;
  for (int32_t base = chunk_hint * 32; base < num_slots; base += 32) {
    const int32_t s = base + lane;
    const bool at_or_below = s < num_slots && __ldg(map.tile_prefix + s) <= v;
    const int32_t below = __popc(__ballot_sync(0xffffffffu, at_or_below));
    if (below < 32) {
      const int32_t slot = base + below;
      if (slot >= num_slots) break;  // v is past the last tile
      chunk_hint = base / 32;
      const int32_t start = slot > 0 ? __ldg(map.tile_prefix + slot - 1) : 0;
      return {slot, __ldg(map.slot_task + slot), v - start};
    }
  }
  return {-1, -1, -1};
}
#endif

}  // namespace staticmoe
