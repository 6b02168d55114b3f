// Host API of the MoE layer: plan (routing -> per-expert rows and task map, on the device), two sm_90a grouped
// GEMMs and the deterministic combine. Raw device pointers, sizes and the caller's stream; no torch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace staticmoe::moe {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

struct Problem {
  int32_t tokens;        // T
  int32_t top_k;         // k
  int32_t num_experts;   // E (<= 1024)
  int32_t hidden;        // H
  int32_t intermediate;  // I
  DType dtype;
  int64_t rows() const { return int64_t(tokens) * top_k; }  // N = T*k (token, slot) pairs
};

// Choices made on the host from shapes only (never from routing counts, which would need a sync).
struct LaunchConfig {
  int32_t block_m;     // rows per CTA tile: 64 or 128
  int32_t cluster_m;   // CTAs per cluster sharing each weight tile (1, or 2 for large experts; block_m 128 only)
  int32_t num_chunks;  // pieces the T*k routing entries are split into by the plan kernels
  // Rows per task-map tile: the plan counts tiles of this size; a cluster splits each among its CTAs.
  int32_t tile_rows() const { return block_m * cluster_m; }
};
LaunchConfig choose_config(const Problem& p);
// Up to this many T*k routing entries the plan runs in one block of one launch (num_chunks == 1; plan.cu).
constexpr int64_t kSingleBlockPlanEntries = 4096;

// The plan's outputs, carved out of one workspace buffer.
struct Plan {
  int32_t* expert_counts;   // [E] rows routed to each expert
  int32_t* expert_offsets;  // [E+1] first sorted row of each expert (expert id order)
  int32_t* chunk_offsets;   // [chunks, E] scratch of the counting sort
  int32_t* expert_order;    // [E] experts in execution order (heavy/light interleaved)
  int32_t* mtile_prefix;    // [E] task map over non-empty experts: inclusive prefix of M tiles
  int32_t* slot_expert;     // [E] real expert of each slot
  int32_t* num_slots;       // [1]
  int32_t* sorted_rows;     // [N] flat (token*k + slot) indices, grouped by expert, ascending inside each expert
};

struct Workspace {
  Plan plan;
  void* intermediate;  // [N, I] SiLU(gate)·up, expert-sorted rows
  void* slot_out;      // [N, H] routing-weighted expert outputs, indexed by flat (token, slot)
};

size_t workspace_bytes(const Problem& p);
Workspace carve_workspace(const Problem& p, void* base);

// Plan kernels (plan.cu). Also adds the per-expert counts into expert_load [E] int64 when it is not null.
cudaError_t build_plan(const Problem& p, const LaunchConfig& cfg, const int32_t* topk_ids, const Plan& plan,
                       int64_t* expert_load, cudaStream_t stream);

// The whole layer (moe_forward.cu): plan, GEMM1 + SiLU·up, GEMM2 x routing weight, combine into out [T, H].
cudaError_t forward(const Problem& p, const void* x, const void* w13, const void* w2, const float* topk_weights,
                    const int32_t* topk_ids, void* out, void* workspace, size_t workspace_size, int64_t* expert_load,
                    int device, cudaStream_t stream);

}  // namespace staticmoe::moe
