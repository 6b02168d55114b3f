// The MoE plan, built on the device with no host synchronisation (CUDA-graph safe):
//  1. count:   each chunk of the T*k routing entries histograms its expert ids (shared-memory counters);
//  2. scan:    one block turns chunk histograms into per-chunk write offsets, expert offsets and M-tile counts,
//              orders the experts (heavy/light interleaved) and builds the task map;
//  3. scatter: one block per chunk writes each entry's flat index to its expert's rows, in entry order, so rows
//              are (token, slot) ascending within each expert — a stable counting sort, deterministic. Ranks come
//              from a block multi-split (block_multisplit.cuh), 1024 entries per round, not a serial pass.
// Up to kSingleBlockPlanEntries routing entries (moe.h: decode and batches of a few hundred tokens) the three
// steps run in one block of one launch, as the fixed cost of a small layer is mostly launches and latency chains.
// Every kernel is launched with PDL (pdl_launch.cuh). Only the one-block plan lets GEMM1 launch early (its CTAs
// set up barriers and wait on the other SMs while the plan runs): on large layers, GEMM1 launched while the chunked
// plan still ran was ~2x slower for its whole run (H100, DeepSeek-V3 T=32768, benchmarks/NOTES.md v3).
// Out-of-range expert ids are ignored (they route nowhere; the Python boundary rejects them on the CPU path).
#include <cub/block/block_scan.cuh>

#include <mutex>

#include "common/block_multisplit.cuh"
#include "common/pdl_launch.cuh"
#include "moe/moe.h"
#include "static_batch/task_map_build.cuh"

namespace staticmoe::moe {
namespace {

constexpr int kCountThreads = 256;
constexpr int kPlanThreads = kTaskMapBuildThreads;  // 1024: one thread per expert in the one-block steps
static_assert(kPlanThreads >= kMaxExperts, "the one-block steps hold one thread per expert");
constexpr int kOrderBins = 256;  // tile counts up to this are ranked with a multi-split (tiles_rank)
using PlanScan = cub::BlockScan<int32_t, kPlanThreads>;  // raking: one warp does the serial part
using PlanMultisplit = BlockMultisplit<kPlanThreads>;
constexpr int kSingleBlockRounds = int(kSingleBlockPlanEntries / kPlanThreads);  // entries per thread, one block

// The multi-split table lives in dynamic shared memory, sized by the keys it ranks: experts, or tile-count bins.
size_t table_bytes(int32_t num_experts) {
  return size_t(PlanMultisplit::table_bytes(num_experts > kOrderBins ? num_experts : kOrderBins));
}

struct ChunkRange {
  int64_t begin, end;
};
__device__ __forceinline__ ChunkRange chunk_range(int64_t n, int chunks, int c) {
  const int64_t len = (n + chunks - 1) / chunks;
  const int64_t b = min(n, c * len);
  return {b, min(n, b + len)};
}

__global__ void __launch_bounds__(kCountThreads)
    plan_count_kernel(const int32_t* topk_ids, int64_t n, int32_t num_experts, int32_t* chunk_offsets) {
  extern __shared__ int32_t hist[];  // [E]
  wait_for_predecessor();  // topk_ids come from the router
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const ChunkRange r = chunk_range(n, gridDim.x, blockIdx.x);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const int32_t e = topk_ids[i];
    if (e >= 0 && e < num_experts) atomicAdd(&hist[e], 1);  // counts do not depend on the order of adds
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) chunk_offsets[int64_t(blockIdx.x) * num_experts + e] = hist[e];
}

// Execution order: sort non-empty experts by M tiles (descending, ties by id), then alternate from both ends:
// heaviest, lightest, 2nd heaviest, 2nd lightest, ... so CTAs running at the same time mix compute-bound and
// memory-bound experts. Rank r of n goes to position 2r if r < ceil(n/2), else 2(n-1-r)+1.
__device__ __forceinline__ int32_t interleaved_position(int32_t rank, int32_t n) {
  return rank < (n + 1) / 2 ? 2 * rank : 2 * (n - 1 - rank) + 1;
}

// An expert's rank by M tiles, descending, ties by id (tiles < 0: not an expert, result meaningless). With at most
// kOrderBins tile counts (every layer up to tens of thousands of rows per expert) a multi-split ranks the experts
// among equals and a scan over the tile-count bins adds the experts with more tiles: O(1) per thread. A count per
// expert over all experts (O(E) per thread, ~14 ns an expert on the H100) is the fallback for larger ones.
__device__ __forceinline__ int32_t tiles_rank(int32_t tiles, int32_t max_tiles, const int32_t* mtiles,
                                              int32_t num_experts, uint8_t* warp_counts,
                                              PlanScan::TempStorage& scan_storage) {
  if (max_tiles < kOrderBins) {
    __shared__ int32_t with_more_tiles[kOrderBins];  // per tile count: the experts with more tiles
    const int32_t bins = max_tiles + 1;
    const PlanMultisplit split{warp_counts, bins};
    const int32_t among_equals = split.rank(tiles);
    // Suffix sum over the bins: thread t holds bin bins-1-t, so an exclusive prefix counts the larger bins.
    const int32_t bin = bins - 1 - int32_t(threadIdx.x);
    int32_t larger;
    PlanScan(scan_storage).ExclusiveSum(bin >= 0 ? split.count(bin) : 0, larger);
    if (bin >= 0) with_more_tiles[bin] = larger;
    __syncthreads();
    return tiles >= 0 ? with_more_tiles[tiles] + among_equals : 0;
  }
  int32_t rank = 0;
  if (tiles >= 0)
    for (int j = 0; j < num_experts; ++j) {
      const int32_t t = mtiles[j];
      rank += (t > tiles) || (t == tiles && j < int(threadIdx.x));
    }
  return rank;
}

// From each expert's count (thread e holds expert e's) to expert counts, offsets, load, M tiles, the execution
// order and the task map. Called by all kPlanThreads threads of the block; returns expert e's first sorted row.
// `warp_counts` is the caller's multi-split table (table_bytes()).
__device__ __forceinline__ int32_t plan_experts(int32_t count, int32_t num_experts, int32_t tile_rows,
                                                const Plan& plan, int64_t* expert_load, uint8_t* warp_counts) {
  __shared__ int32_t mtiles[kMaxExperts];
  __shared__ int32_t order[kMaxExperts];
  __shared__ int32_t num_nonempty, max_tiles;
  __shared__ PlanScan::TempStorage scan_storage;
  const int e = threadIdx.x;
  const bool is_expert = e < num_experts;
  const int32_t tiles = (count + tile_rows - 1) / tile_rows;
  if (is_expert) {
    plan.expert_counts[e] = count;
    if (expert_load) expert_load[e] += count;
    mtiles[e] = tiles;
  }
  if (e == 0) num_nonempty = max_tiles = 0;
  int32_t offset, total;
  PlanScan(scan_storage).ExclusiveSum(count, offset, total);
  if (is_expert) plan.expert_offsets[e] = offset;
  if (e == 0) plan.expert_offsets[num_experts] = total;
  __syncthreads();  // also: scan_storage may be reused
  if (is_expert && count > 0) atomicAdd(&num_nonempty, 1);  // a count and a max: order-independent
  if (is_expert) atomicMax(&max_tiles, tiles);
  __syncthreads();
  // Empty experts go after the non-empty ones (the map skips them anyway).
  const int32_t rank = tiles_rank(is_expert ? tiles : -1, max_tiles, mtiles, num_experts, warp_counts, scan_storage);
  if (is_expert) order[tiles > 0 ? interleaved_position(rank, num_nonempty) : rank] = e;
  __syncthreads();
  if (is_expert) plan.expert_order[e] = order[e];
  task_map_build_block_impl(mtiles, order, num_experts, plan.mtile_prefix, plan.slot_expert, plan.num_slots);
  return offset;
}

__global__ void __launch_bounds__(kPlanThreads)
    plan_scan_kernel(int32_t num_experts, int32_t chunks, int32_t tile_rows, Plan plan, int64_t* expert_load) {
  extern __shared__ __align__(4) uint8_t warp_counts[];  // table_bytes(num_experts)
  wait_for_predecessor();
  const int e = threadIdx.x;
  int32_t count = 0;
  if (e < num_experts) {
    for (int c = 0; c < chunks; ++c) {  // column scan: chunk c's first row for expert e, relative to the expert
      int32_t* slot = plan.chunk_offsets + int64_t(c) * num_experts + e;
      const int32_t v = *slot;
      *slot = count;
      count += v;
    }
  }
  plan_experts(count, num_experts, tile_rows, plan, expert_load, warp_counts);
}

// One round of the stable scatter, called by all kPlanThreads threads with one entry each (expert < 0: none): the
// entry goes to its expert's next free sorted row after the round's earlier entries of that expert, so rows stay
// in entry order; unless it is the last round, next_row[e] (shared) then advances by the round's count of expert e.
__device__ __forceinline__ void scatter_round(int32_t expert, int64_t entry, bool last_round, int32_t num_experts,
                                              int32_t* next_row, uint8_t* warp_counts, int32_t* sorted_rows) {
  const PlanMultisplit split{warp_counts, num_experts};
  const int32_t rank = split.rank(expert);  // its leading barrier also publishes next_row
  if (expert >= 0) sorted_rows[next_row[expert] + rank] = int32_t(entry);
  if (last_round) return;  // uniform across the block
  __syncthreads();  // next_row has been read
  if (int(threadIdx.x) < num_experts) next_row[threadIdx.x] += split.count(threadIdx.x);
}

__device__ __forceinline__ int32_t expert_of(const int32_t* topk_ids, int64_t i, int64_t end, int32_t num_experts) {
  const int32_t id = i < end ? topk_ids[i] : -1;
  return id >= 0 && id < num_experts ? id : -1;  // out-of-range ids route nowhere
}

// The whole plan in one block (T*k <= kSingleBlockPlanEntries): histogram, plan_experts, scatter. Each thread
// keeps its (up to kSingleBlockRounds) expert ids in registers from the histogram to the scatter.
__global__ void __launch_bounds__(kPlanThreads)
    plan_single_block_kernel(const int32_t* topk_ids, int64_t n, int32_t num_experts, int32_t tile_rows, Plan plan,
                             int64_t* expert_load) {
  __shared__ int32_t per_expert[kMaxExperts];  // the histogram, then each expert's next free sorted row
  extern __shared__ __align__(4) uint8_t warp_counts[];  // table_bytes(num_experts)
  wait_for_predecessor();
  allow_dependents();  // GEMM1's prologue overlaps this plan; it reads the plan only after its own wait
  const int e = threadIdx.x;
  if (e < num_experts) per_expert[e] = 0;
  int32_t expert[kSingleBlockRounds];
#pragma unroll
  for (int r = 0; r < kSingleBlockRounds; ++r) expert[r] = expert_of(topk_ids, r * kPlanThreads + e, n, num_experts);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kSingleBlockRounds; ++r)
    if (expert[r] >= 0) atomicAdd(&per_expert[expert[r]], 1);  // counts do not depend on the order of adds
  __syncthreads();
  const int32_t offset = plan_experts(e < num_experts ? per_expert[e] : 0, num_experts, tile_rows, plan, expert_load,
                                      warp_counts);  // its barriers order the histogram reads before this write
  if (e < num_experts) per_expert[e] = offset;
#pragma unroll 1  // one copy of the round's code, not kSingleBlockRounds
  for (int r = 0; r * kPlanThreads < n; ++r) {  // uniform across the block: every thread takes the barriers
    int32_t mine = expert[0];
#pragma unroll
    for (int j = 1; j < kSingleBlockRounds; ++j) mine = r == j ? expert[j] : mine;  // selects keep it in registers
    scatter_round(mine, r * kPlanThreads + e, (r + 1) * kPlanThreads >= n, num_experts, per_expert, warp_counts,
                  plan.sorted_rows);
  }
}

// Chunked plan, step 3: one block per chunk, kPlanThreads entries per round.
__global__ void __launch_bounds__(kPlanThreads)
    plan_scatter_kernel(const int32_t* topk_ids, int64_t n, int32_t num_experts, Plan plan) {
  __shared__ int32_t next_row[kMaxExperts];  // this chunk's next free sorted row of each expert
  extern __shared__ __align__(4) uint8_t warp_counts[];  // table_bytes(num_experts)
  wait_for_predecessor();
  const int c = blockIdx.x;
  if (int(threadIdx.x) < num_experts)
    next_row[threadIdx.x] = plan.expert_offsets[threadIdx.x] + plan.chunk_offsets[int64_t(c) * num_experts + threadIdx.x];
  const ChunkRange r = chunk_range(n, gridDim.x, c);
  for (int64_t base = r.begin; base < r.end; base += kPlanThreads) {
    const int64_t i = base + threadIdx.x;
    scatter_round(expert_of(topk_ids, i, r.end, num_experts), i, base + kPlanThreads >= r.end, num_experts, next_row,
                  warp_counts, plan.sorted_rows);
  }
}

// Static plus dynamic shared memory above 48 KB needs a per-kernel, per-device opt-in (here for E > ~800): made
// once per device, for the largest table.
cudaError_t allow_largest_table() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaError_t status[kMaxDevices];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device >= kMaxDevices) return cudaErrorInvalidDevice;
  std::call_once(once[device], [device] {
    const int bytes = int(table_bytes(kMaxExperts));
    cudaError_t err = cudaFuncSetAttribute(plan_single_block_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess)
      err = cudaFuncSetAttribute(plan_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    status[device] = err;
  });
  return status[device];
}

}  // namespace

cudaError_t build_plan(const Problem& p, const LaunchConfig& cfg, const int32_t* topk_ids, const Plan& plan,
                       int64_t* expert_load, cudaStream_t stream) {
  const int64_t n = p.rows();
  const size_t table = table_bytes(p.num_experts);
  cudaError_t err = allow_largest_table();
  if (err != cudaSuccess) return err;
  if (cfg.num_chunks == 1)
    return launch_with_pdl(plan_single_block_kernel, 1, kPlanThreads, table, stream, topk_ids, n, p.num_experts,
                           cfg.tile_rows(), plan, expert_load);
  const size_t hist_bytes = sizeof(int32_t) * p.num_experts;
  err = launch_with_pdl(plan_count_kernel, cfg.num_chunks, kCountThreads, hist_bytes, stream, topk_ids, n,
                        p.num_experts, plan.chunk_offsets);
  if (err != cudaSuccess) return err;
  err = launch_with_pdl(plan_scan_kernel, 1, kPlanThreads, table, stream, p.num_experts, cfg.num_chunks,
                        cfg.tile_rows(), plan, expert_load);
  if (err != cudaSuccess) return err;
  return launch_with_pdl(plan_scatter_kernel, cfg.num_chunks, kPlanThreads, table, stream, topk_ids, n, p.num_experts,
                         plan);
}

}  // namespace staticmoe::moe
