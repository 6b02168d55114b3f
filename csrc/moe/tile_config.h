// Every tile choice of the MoE GEMMs, both precisions, in one place (as DeepGEMM keeps its heuristics in one
// file): the host chooser (`choose_config`, moe_forward.cu) picks a TileKind from shapes only, and the dispatch
// (sm90_gemm.cu) instantiates the kernels with the `Tiles` of that kind. The plan counts M tiles of tile_rows().
#pragma once
#include <cstdint>

namespace staticmoe::moe {

constexpr int32_t kMaxExperts = 1024;               // the plan's one-block steps hold one thread per expert
constexpr int64_t kDecodeMaxRowsPerExpert = 64;     // expected rows per expert up to which decode tiles are used
constexpr int64_t kClusterMinRows = 512;            // from here two CTAs share each weight tile (TMA multicast)
constexpr int kGroupM = 4;                          // M tiles per raster group (benchmarks/NOTES.md v3, v4)
// FP8 GEMM2 posts each tile's task to the math warps (kPosted; STATICMOE_FP8_POSTED_TILES=0 stops it) up to this K: with
// few K steps a tile's decode is a large share of it (H100, T=8192: -11% at K=768, -8% at 1024, -5% at 1536, even
// at 2048, +9% at 14336; GEMM1 loses at every shape: benchmarks/NOTES.md "Session 25").
constexpr int kFp8PostedMaxK = 1536;
constexpr int kProducerThreads = 128;               // one warpgroup: setmaxnreg works per warpgroup

enum class TileKind : int32_t { kDecode = 0, kLarge = 1, kLargeCluster = 2 };

// kBlockN1 / kBlockN2: weight rows per tile of GEMM1 (gate + up halves) and GEMM2. A K step is one 128-byte
// swizzle row: 64 elements in 16-bit, 128 in FP8 (exactly one scale block).
template <bool kFP8, TileKind kKind>
struct Tiles;

// 16-bit weights. 128x256 where experts are large (1.5x the FLOPs per byte of L2 traffic of 128x128); 64x128 for
// decode, where more, narrower tiles keep more SMs streaming weights.
template <>
struct Tiles<false, TileKind::kDecode> {
  static constexpr int kBlockM = 64, kBlockN1 = 128, kBlockN2 = 128, kStages = 6, kCluster = 1;
};
template <>
struct Tiles<false, TileKind::kLarge> {
  static constexpr int kBlockM = 128, kBlockN1 = 256, kBlockN2 = 256, kStages = 4, kCluster = 1;
};
template <>
struct Tiles<false, TileKind::kLargeCluster> {
  static constexpr int kBlockM = 128, kBlockN1 = 256, kBlockN2 = 256, kStages = 4, kCluster = 2;
};

// FP8 weights with 128x128 block scales. GEMM1 always takes 128 gate + 128 up rows: its epilogue quantises the
// 128 intermediate columns of one scale group inside the tile. Each K block's partial sums are promoted into a
// second fp32 accumulator, so a 256-wide tile is computed as two 128-wide halves (64 + 128 accumulator registers).
template <>
struct Tiles<true, TileKind::kDecode> {
  static constexpr int kBlockM = 64, kBlockN1 = 256, kBlockN2 = 128, kStages = 5, kCluster = 1;
};
template <>
struct Tiles<true, TileKind::kLarge> {
  static constexpr int kBlockM = 128, kBlockN1 = 256, kBlockN2 = 256, kStages = 4, kCluster = 1;
};
template <>
struct Tiles<true, TileKind::kLargeCluster> {
  static constexpr int kBlockM = 128, kBlockN1 = 256, kBlockN2 = 256, kStages = 4, kCluster = 2;
};

// Rows per task-map tile: the plan counts tiles of this size; a cluster splits each among its CTAs.
template <bool kFP8, TileKind kKind>
constexpr int32_t tile_rows_of() {
  return Tiles<kFP8, kKind>::kBlockM * Tiles<kFP8, kKind>::kCluster;
}
constexpr int32_t tile_rows(bool fp8, TileKind kind) {
  if (kind == TileKind::kDecode) return fp8 ? tile_rows_of<true, TileKind::kDecode>() : tile_rows_of<false, TileKind::kDecode>();
  if (kind == TileKind::kLarge) return fp8 ? tile_rows_of<true, TileKind::kLarge>() : tile_rows_of<false, TileKind::kLarge>();
  return fp8 ? tile_rows_of<true, TileKind::kLargeCluster>() : tile_rows_of<false, TileKind::kLargeCluster>();
}

// From shapes only (expected rows per expert under balanced routing), never from routing counts (a host sync).
// `cluster_min_rows` is kClusterMinRows unless a tuning probe overrides it.
constexpr TileKind choose_tile_kind(int64_t rows_per_expert, int64_t cluster_min_rows) {
  if (rows_per_expert <= kDecodeMaxRowsPerExpert) return TileKind::kDecode;
  return rows_per_expert >= cluster_min_rows ? TileKind::kLargeCluster : TileKind::kLarge;
}

}  // namespace staticmoe::moe
