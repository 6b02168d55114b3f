// The pipeline skeleton both grouped GEMMs share (sm90_gemm.cuh: 16-bit, sm90_gemm_fp8.cuh: FP8): persistent CTAs
// walk the task map's tiles in the same order in every warp; the producer warpgroup fills a ring of kStages
// shared-memory stages (`full` mbarriers), the math warpgroups hand each stage back through its `empty` mbarrier.
// The kernels keep what differs: what a stage holds, the mainloop's MMAs and the epilogue.
#pragma once
#include "common/pdl_launch.cuh"
#include "common/sm90_ptx.cuh"
#include "common/tile_clocks.cuh"
#include "moe/tile_bias.cuh"
#include "moe/tile_config.h"
#include "static_batch/task_map.h"

namespace staticmoe::moe {

template <int kBlockM>
constexpr int gemm_threads() { return kProducerThreads + 2 * kBlockM; }  // + one math warpgroup per 64 rows
constexpr int kProducerRegs = 56;   // pointers of the gathered rows and loop state
constexpr int kConsumerRegs = 224;  // 128 fp32 accumulators (FP8: 64 partial + 128 promoted) + epilogue;
                                    // 128*56 + 256*224 <= 64K

// One tile of work, decoded by the producer and by every math warp, or posted by the producer (post_tile / take_tile).
struct alignas(16) TileWork {
  int32_t expert, rows, m0, row_base, n_tile;
};

// FP8 GEMM2's kPosted (the default where K is short; STATICMOE_FP8_POSTED_TILES=0 turns it off, sm90_gemm.cu):
// the math warps take each tile's TileWork from shared memory once the tile's first stage has landed, instead of
// decoding the task map themselves: the decode is three dependent L2 loads (~1.3-2.2k cycles a tile on the H100,
// with the tensor cores idle, benchmarks/NOTES.md "Session 22"), and the producer decodes every tile anyway, ahead
// of time. A ring of kTileSlots: the producer's thread 0 writes tile t's slot at the tile's start, before its
// arrival on the tile's first `full` barrier (an mbarrier arrive releases, the math warps' wait acquires). The slot
// is free by then: the math warps read tile t - kTileSlots's slot before releasing that tile's first stage, and the
// producer has waited for the release of a later stage (every tile has a K step, so kStages + 1 tiles span more
// than kStages stages). The kernel places the ring at a fixed offset from its barriers (Fp8Smem::tile_ring), so
// neither side keeps a pointer to it in registers (the FP8 producer has none to spare), and the tile's index in
// this CTA's sequence comes from v.
template <int kStages>
constexpr int kTileSlots = kStages + 1;
template <int kCluster>
__device__ __forceinline__ int32_t tile_count(int32_t v) {  // this CTA's tiles before v (no counter kept live)
  return (v - int32_t(blockIdx.x) / kCluster) / (int32_t(gridDim.x) / kCluster);
}
template <int kStages, int kCluster>
__device__ __forceinline__ void post_tile(TileWork* ring, int32_t v, const TileWork& w) {
  ring[tile_count<kCluster>(v) % kTileSlots<kStages>] = w;
}
template <int kStages, int kCluster>
__device__ __forceinline__ TileWork take_tile(const TileWork* ring, uint64_t* full, int32_t v, uint32_t g) {
  sm90::mbarrier_wait(&full[g % kStages], (g / kStages) & 1);
  return ring[tile_count<kCluster>(v) % kTileSlots<kStages>];
}

// v / n_tiles is an M tile of the map, the remainder an N tile. Within an expert, tiles are rastered in groups of
// args.group_m M tiles with M fastest: CTAs resident at the same time then share a few weight panels and a few
// activation panels in L2 instead of streaming all of the expert's rows once per N tile.
// With clusters, the map's M tiles are units of kCluster·kBlockM rows; each CTA takes the part of its cluster rank.
template <int kBlockM, int kCluster, typename Args>
__device__ __forceinline__ TileWork decode_tile(const Args& args, int32_t v, int32_t num_slots,
                                                int32_t& chunk_hint) {
  constexpr int kUnitRows = kCluster * kBlockM;
  const TileCoord tc = task_map_decode_warp(args.map, v / args.n_tiles, num_slots, chunk_hint);
  const int32_t rows = args.expert_counts[tc.task];
  const int32_t m_tiles = (rows + kUnitRows - 1) / kUnitRows;
  const int32_t local = tc.tile * args.n_tiles + v % args.n_tiles;  // 0 .. m_tiles * n_tiles - 1
  const int32_t group = local / (args.group_m * args.n_tiles);
  const int32_t first_m = group * args.group_m;
  const int32_t group_m = min(args.group_m, m_tiles - first_m);
  const int32_t in_group = local - group * args.group_m * args.n_tiles;
  const int32_t rank = kCluster > 1 ? int32_t(sm90::cluster_cta_rank()) : 0;  // a special register: no live value
  const int32_t m0 = (first_m + in_group % group_m) * kUnitRows + rank * kBlockM;
  return {tc.task, rows, m0, args.expert_offsets[tc.task] + m0, in_group / group_m};
}

// Where a CTA starts: its cluster rank, and the task map's non-empty slots and tiles (times the N tiles of each).
struct PipelineStart {
  uint32_t cta_rank;
  int32_t num_slots, total;
};

// The kernel prologue before the warpgroups split. Thread 0 sets up the stage barriers; the CTA (or the cluster:
// peers arrive on our barriers and multicast into our stages) syncs. All of this overlaps the previous kernel's
// tail; the plan and the activations (x, quantised x or GEMM1's output) are read only after wait_for_predecessor.
template <int kBlockM, int kStages, int kCluster>
__device__ __forceinline__ void init_pipeline(const CUtensorMap& weights, uint64_t* full, uint64_t* empty) {
  static_assert(kCluster == 1 || kCluster == 2, "a cluster is one CTA or a pair (peer = rank ^ 1)");
  if (threadIdx.x == 0) {
    sm90::prefetch_tensor_map(&weights);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&full[s], kProducerThreads + 1);  // one cp.async arrival per producer thread + the TMA's
      sm90::mbarrier_init(&empty[s], kCluster * (kBlockM / 64) * 4);  // one arrival per math warp of the cluster
    }
    sm90::fence_barrier_init();
  }
  if constexpr (kCluster > 1) sm90::cluster_sync();
  else __syncthreads();
}

// The task map's non-empty slots and its tiles (times the N tiles of each).
struct TaskTiles {
  int32_t num_slots, total;
};
template <typename Args>
__device__ __forceinline__ TaskTiles task_tiles(const Args& args) {
  const int32_t num_slots = *args.map.num_slots;
  return {num_slots, task_map_total_tiles(args.map.tile_prefix, num_slots) * args.n_tiles};
}

// init_pipeline, then the task map's totals read once before the warpgroups split. (The FP8 kernels' posted-tile
// variant reads them in each warpgroup after setmaxnreg instead: ptxas spills a value live across setmaxnreg when
// the producer is short of registers.)
template <int kBlockM, int kStages, int kCluster, typename Args>
__device__ __forceinline__ PipelineStart start_pipeline(const CUtensorMap& weights, const Args& args, uint64_t* full,
                                                        uint64_t* empty) {
  init_pipeline<kBlockM, kStages, kCluster>(weights, full, empty);
  const uint32_t cta_rank = kCluster > 1 ? sm90::cluster_cta_rank() : 0;
  wait_for_predecessor();
  const TaskTiles tiles = task_tiles(args);
  return {cta_rank, tiles.num_slots, tiles.total};
}

// setmaxnreg moves registers from the producer warpgroup to the math warpgroups. Only the 384-thread kernel is
// register-limited (168 a thread at launch); the 256-thread one already has 224.
template <int kBlockM>
constexpr bool kRebalanceRegs = gemm_threads<kBlockM>() * kConsumerRegs > 65536;
template <int kBlockM>
__device__ __forceinline__ void become_producer() {
  if constexpr (kRebalanceRegs<kBlockM>) sm90::setmaxnreg_dec<kProducerRegs>();
}
template <int kBlockM>
__device__ __forceinline__ void become_consumer() {
  if constexpr (kRebalanceRegs<kBlockM>) sm90::setmaxnreg_inc<kConsumerRegs>();
}

// The kernel epilogue. With a cluster, our shared memory stays alive while peers still arrive on it. The next
// kernel may launch once every CTA has issued its last tile, so its prologue overlaps our tail only (triggering at
// the start slowed large layers down; benchmarks/NOTES.md v3).
template <int kCluster>
__device__ __forceinline__ void finish_pipeline() {
  if constexpr (kCluster > 1) sm90::cluster_sync();
  allow_dependents();
}

// One thread's TMA loads of the weight tile of k-step k0 into b_tile, completing on `full` (the stage's barrier):
// kBoxes boxes of kBoxRows rows, GEMM1's gate and up rows of w13[e] (matrices 2e and 2e+1), GEMM2's consecutive
// parts of the N tile of w2[e]. With a cluster, CTA r loads box r into both CTAs.
template <int kBoxRows, int kBoxes, int kCluster, bool kGateUp>
__device__ __forceinline__ void load_weight_tile(const CUtensorMap& weights, uint64_t* full, uint8_t* b_tile, int32_t k0,
                                                 const TileWork& w, uint32_t cta_rank) {
  sm90::mbarrier_arrive_expect_tx(full, kBoxes * kBoxRows * 128);
  for (int box = 0; box < kBoxes; ++box) {
    if (kCluster > 1 && box != int(cta_rank)) continue;
    const int row = kGateUp ? w.n_tile * kBoxRows : w.n_tile * kBoxes * kBoxRows + box * kBoxRows;
    const int matrix = kGateUp ? 2 * w.expert + box : w.expert;
    uint8_t* dst = b_tile + box * kBoxRows * 128;
    if constexpr (kCluster > 1)
      sm90::tma_load_3d_multicast(dst, &weights, full, k0, row, matrix, (1u << kCluster) - 1);
    else
      sm90::tma_load_3d(dst, &weights, full, k0, row, matrix);
  }
}

// Lane 0 of a math warp hands k-step `step`'s stage back once the wgmmas reading it have retired in this warp; with a
// cluster, to the peer CTA too (its producer multicasts into our stage).
template <int kStages, int kCluster>
__device__ __forceinline__ void release_stage(uint64_t* empty, uint32_t step, int lane) {
  if (lane != 0) return;
  sm90::mbarrier_arrive(&empty[step % kStages]);
  if constexpr (kCluster > 1) sm90::mbarrier_arrive_cluster(&empty[step % kStages], sm90::cluster_cta_rank() ^ 1);
}

// The math warps' wait for K step kt's stage (k-step count g); after take_tile (kt = 0) it returns at once (the stage
// cannot be refilled before these warps release it). Probe builds (common/tile_clocks.cuh) stamp the first step's
// arrival and add the later steps' waiting to the tile's data-wait sum; elsewhere it is the bare wait.
template <int kStages, bool kGateUp>
__device__ __forceinline__ void wait_stage(uint64_t* full, uint32_t g, int32_t kt, bool recorder, int tile) {
  const unsigned long long waited_from = probe::now();  // 0 outside probe builds
  sm90::mbarrier_wait(&full[g % kStages], (g / kStages) & 1);
  if (kt == 0) probe::tile_clock<kGateUp>(recorder, tile, probe::kDataReady);
  else probe::tile_add<kGateUp>(recorder, tile, probe::kStarved, probe::now() - waited_from);
}

// A CTA whose half of a cluster's unit has no rows computes nothing, but its math warps still take the tile's k-steps
// through the pipeline: the peer's producer multicasts into our stages and waits for our release. Returns the
// k-step count g after the tile.
template <int kStages, int kCluster>
__device__ __forceinline__ uint32_t pass_stages_through(uint64_t* full, uint64_t* empty, int32_t k_iters, uint32_t g,
                                                        int lane) {
  for (int32_t kt = 0; kt < k_iters; ++kt, ++g) {
    sm90::mbarrier_wait(&full[g % kStages], (g / kStages) & 1);
    release_stage<kStages, kCluster>(empty, g, lane);
  }
  return g;
}

// The optional bias of tile w, staged into this warp's slice now and read after the mainloop (tile_bias.cuh).
// args.bias: GEMM1 [E, 2 n_out] (gate, then up), GEMM2 [E, n_out]; null = none (a uniform branch).
template <int kBlockN, bool kGateUp, typename T, typename Args>
__device__ __forceinline__ void stage_tile_bias(const Args& args, const TileWork& w, T* bias_slice, int lane) {
  if (args.bias) {
    constexpr int kSeg = kBlockN / 2;  // GEMM1: gate | up columns of the tile; GEMM2: two halves of its columns
    const int32_t col0 = kGateUp ? w.n_tile * kSeg : w.n_tile * kBlockN;
    const T* seg0 = args.bias + int64_t(w.expert) * (kGateUp ? 2 : 1) * args.n_out + col0;
    TileBias<T, kBlockN>::stage_async(bias_slice, seg0, args.n_out - col0, seg0 + (kGateUp ? args.n_out : kSeg),
                                      args.n_out - col0 - (kGateUp ? 0 : kSeg), lane);
  }
}

}  // namespace staticmoe::moe
