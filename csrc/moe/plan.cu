// The MoE plan, built on the device with no host synchronisation (CUDA-graph safe):
//  1. count:   each chunk of the T*k routing entries histograms its expert ids (shared-memory counters);
//  2. scan:    one block turns chunk histograms into per-chunk write offsets, expert offsets and M-tile counts,
//              orders the experts (heavy/light interleaved) and builds the task map;
//  3. scatter: one warp per chunk writes each entry's flat index to its expert's rows, in entry order, so rows
//              are (token, slot) ascending within each expert — a stable counting sort, deterministic.
// With a single chunk (T*k <= 1024: decode and small batches) the three steps run in one block of one launch, as
// the fixed cost of a small layer is mostly launches. Every kernel is launched with PDL (pdl_launch.cuh) but none
// triggers its dependents early: GEMM1 launched while the plan still ran was ~2x slower on large layers (H100,
// DeepSeek-V3 T=32768, benchmarks/NOTES.md v3), so GEMM1 starts when the plan has completed.
// Out-of-range expert ids are ignored (they route nowhere; the Python boundary rejects them on the CPU path).
#include <cub/block/block_scan.cuh>

#include "common/pdl_launch.cuh"
#include "moe/moe.h"
#include "static_batch/task_map_build.cuh"

namespace staticmoe::moe {
namespace {

constexpr int kCountThreads = 256;

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

// From each expert's count (thread e holds expert e's) to expert counts, offsets, load, M tiles, the execution
// order and the task map. Called by all kTaskMapBuildThreads threads of the block; offsets also go to
// `offsets_out` (shared memory) when it is given.
__device__ __forceinline__ void plan_experts(int32_t count, int32_t num_experts, int32_t tile_rows, const Plan& plan,
                                             int64_t* expert_load, int32_t* offsets_out) {
  __shared__ int32_t mtiles[1024];
  __shared__ int32_t order[1024];
  __shared__ int32_t num_nonempty;
  using Scan = cub::BlockScan<int32_t, kTaskMapBuildThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int e = threadIdx.x;
  if (e < num_experts) {
    plan.expert_counts[e] = count;
    if (expert_load) expert_load[e] += count;
    mtiles[e] = (count + tile_rows - 1) / tile_rows;
  }
  int32_t offset, total;
  Scan(scan_storage).ExclusiveSum(count, offset, total);
  if (e < num_experts) {
    plan.expert_offsets[e] = offset;
    if (offsets_out) offsets_out[e] = offset;
  }
  if (e == 0) plan.expert_offsets[num_experts] = total;
  if (e == 0) num_nonempty = 0;
  __syncthreads();
  if (e < num_experts && count > 0) atomicAdd(&num_nonempty, 1);  // a count: order-independent
  __syncthreads();
  // Empty experts go after the non-empty ones (the map skips them anyway).
  if (e < num_experts) {
    const int32_t mine = mtiles[e];
    int32_t rank = 0;
    for (int j = 0; j < num_experts; ++j) {
      const int32_t t = mtiles[j];
      rank += (t > mine) || (t == mine && j < e);
    }
    const int32_t n = num_nonempty;
    order[mine > 0 ? interleaved_position(rank, n) : rank] = e;
  }
  __syncthreads();
  if (e < num_experts) plan.expert_order[e] = order[e];
  task_map_build_block_impl(mtiles, order, num_experts, plan.mtile_prefix, plan.slot_expert, plan.num_slots);
}

__global__ void __launch_bounds__(kTaskMapBuildThreads)
    plan_scan_kernel(int32_t num_experts, int32_t chunks, int32_t tile_rows, Plan plan, int64_t* expert_load) {
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
  plan_experts(count, num_experts, tile_rows, plan, expert_load, nullptr);
}

// One warp writes the entries [begin, end) to their experts' sorted rows in entry order; next_row[e] is the next
// free sorted row of expert e (advanced as it goes).
__device__ __forceinline__ void scatter_entries(const int32_t* topk_ids, int64_t begin, int64_t end,
                                                int32_t num_experts, int32_t* next_row, int32_t* sorted_rows) {
  const int lane = threadIdx.x & 31;
  const uint32_t lanes_below = (1u << lane) - 1;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int32_t e = i < end ? topk_ids[i] : -1;
    const bool valid = e >= 0 && e < num_experts;
    const uint32_t peers = __match_any_sync(0xffffffffu, valid ? e : -1);  // lanes with the same expert
    if (valid) sorted_rows[next_row[e] + __popc(peers & lanes_below)] = int32_t(i);
    __syncwarp();
    if (valid && (peers & lanes_below) == 0) next_row[e] += __popc(peers);  // lowest peer advances the cursor
    __syncwarp();
  }
}

// The whole plan for a single chunk: histogram, plan_experts, then warp 0 scatters.
__global__ void __launch_bounds__(kTaskMapBuildThreads)
    plan_single_block_kernel(const int32_t* topk_ids, int64_t n, int32_t num_experts, int32_t tile_rows, Plan plan,
                             int64_t* expert_load) {
  __shared__ int32_t hist[1024];
  __shared__ int32_t next_row[1024];
  wait_for_predecessor();
  const int e = threadIdx.x;
  if (e < num_experts) hist[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int32_t id = topk_ids[i];
    if (id >= 0 && id < num_experts) atomicAdd(&hist[id], 1);
  }
  __syncthreads();
  plan_experts(e < num_experts ? hist[e] : 0, num_experts, tile_rows, plan, expert_load, next_row);
  __syncthreads();
  if (threadIdx.x < 32) scatter_entries(topk_ids, 0, n, num_experts, next_row, plan.sorted_rows);
}

__global__ void __launch_bounds__(32)
    plan_scatter_kernel(const int32_t* topk_ids, int64_t n, int32_t num_experts, Plan plan) {
  extern __shared__ int32_t next_row[];  // [E] next free sorted row of each expert for this chunk
  wait_for_predecessor();
  const int c = blockIdx.x;
  for (int e = threadIdx.x; e < num_experts; e += 32)
    next_row[e] = plan.expert_offsets[e] + plan.chunk_offsets[int64_t(c) * num_experts + e];
  __syncwarp();
  const ChunkRange r = chunk_range(n, gridDim.x, c);
  scatter_entries(topk_ids, r.begin, r.end, num_experts, next_row, plan.sorted_rows);
}

}  // namespace

cudaError_t build_plan(const Problem& p, const LaunchConfig& cfg, const int32_t* topk_ids, const Plan& plan,
                       int64_t* expert_load, cudaStream_t stream) {
  const int64_t n = p.rows();
  if (cfg.num_chunks == 1)
    return launch_with_pdl(plan_single_block_kernel, 1, kTaskMapBuildThreads, 0, stream, topk_ids, n, p.num_experts,
                           cfg.tile_rows(), plan, expert_load);
  const size_t hist_bytes = sizeof(int32_t) * p.num_experts;
  cudaError_t err = launch_with_pdl(plan_count_kernel, cfg.num_chunks, kCountThreads, hist_bytes, stream, topk_ids, n,
                                    p.num_experts, plan.chunk_offsets);
  if (err != cudaSuccess) return err;
  err = launch_with_pdl(plan_scan_kernel, 1, kTaskMapBuildThreads, 0, stream, p.num_experts, cfg.num_chunks,
                        cfg.tile_rows(), plan, expert_load);
  if (err != cudaSuccess) return err;
  return launch_with_pdl(plan_scatter_kernel, cfg.num_chunks, 32, hist_bytes, stream, topk_ids, n, p.num_experts, plan);
}

}  // namespace staticmoe::moe
