// Per-tile timestamps of the grouped GEMMs in a probe build (-DSTATICMOE_TILE_CLOCKS, passed through CMake's
// STATICMOE_EXTRA_NVCC_FLAGS; `gpu_check.sh tile-clocks`): the first math thread of CTA 0 records clock64() at five
// points of every tile it takes, so benchmarks/profile_tile_clocks.py can split a tile's cycles into decoding it,
// waiting for its first stage, the mainloop and the epilogue, plus the sum of the mainloop's later waits for a
// stage's data (a mainloop starved by its producer, or one slowed inside its own steps). Session 21 changed the FP8
// GEMMs on guesses about where their ~5 µs per tile goes and lost every time (benchmarks/NOTES.md); this measures
// it. In a normal build every call compiles to nothing.
#pragma once
#include <cstdint>

namespace staticmoe::probe {

enum TileEvent : int {
  kTileStart, kTileDecoded, kDataReady, kMainloopDone, kEpilogueDone,  // stamps
  kStarved,  // a sum: cycles the mainloop waited on `full` barriers after its first K step
  kTileEvents
};
constexpr int kProbedTiles = 512;  // per GEMM and launch; later tiles are not recorded
constexpr int kProbedGemms = 2;    // GEMM1 (gate/up), GEMM2 (down): the last launch of each overwrites its row

#ifdef STATICMOE_TILE_CLOCKS
__device__ unsigned long long g_tile_clocks[kProbedGemms][kProbedTiles][kTileEvents];
__device__ int g_tiles_taken[kProbedGemms];

// `tile`: the recorder's count of tiles so far; `recorder`: true in one thread of the grid.
// A tile's start also clears its later stamps, so a tile that skips them (an empty cluster half) or an older launch
// with more tiles leaves zeros, not stale values.
template <bool kGateUp>
__device__ __forceinline__ void tile_clock(bool recorder, int tile, TileEvent event) {
  if (!recorder || tile >= kProbedTiles) return;
  unsigned long long* stamps = g_tile_clocks[kGateUp ? 0 : 1][tile];
  if (event == kTileStart)
    for (int e = kTileDecoded; e < kTileEvents; ++e) stamps[e] = 0;
  stamps[event] = clock64();
}
template <bool kGateUp>
__device__ __forceinline__ void tile_add(bool recorder, int tile, TileEvent event, unsigned long long cycles) {
  if (recorder && tile < kProbedTiles) g_tile_clocks[kGateUp ? 0 : 1][tile][event] += cycles;
}
__device__ __forceinline__ unsigned long long now() { return clock64(); }
template <bool kGateUp>
__device__ __forceinline__ void tiles_taken(bool recorder, int tiles) {
  if (recorder) g_tiles_taken[kGateUp ? 0 : 1] = tiles;
}
#else
template <bool kGateUp>
__device__ __forceinline__ void tile_clock(bool, int, TileEvent) {}
template <bool kGateUp>
__device__ __forceinline__ void tile_add(bool, int, TileEvent, unsigned long long) {}
__device__ __forceinline__ constexpr unsigned long long now() { return 0; }
template <bool kGateUp>
__device__ __forceinline__ void tiles_taken(bool, int) {}
#endif

}  // namespace staticmoe::probe
