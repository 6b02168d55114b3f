// Host API of the MoE layer: plan (routing -> per-expert rows and task map, on the device), two sm_90a grouped
// GEMMs and the deterministic combine. Raw device pointers, sizes and the caller's stream; no torch.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "moe/tile_config.h"

namespace staticmoe::moe {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// GEMM1's epilogue activation h = act(gate, up) (codes as model/kernels/activation.py ACTIVATION_CODES):
//   kSiLU:      SiLU(gate) * up
//   kSwigluOai: gpt-oss: gate = min(gate, 7), up = clamp(up, -7, 7), h = (up + 1) * gate * sigmoid(1.702 * gate)
enum class Activation : int { kSiLU = 0, kSwigluOai = 1 };
constexpr float kSwigluOaiAlpha = 1.702f, kSwigluOaiLimit = 7.0f;

// Optional expert biases in the activation dtype (bf16 with FP8 weights): w13 [E, 2I] (gate biases then up biases, added
// to GEMM1's fp32 accumulators before the activation), w2 [E, H] (added to GEMM2's before the routing weight, so the
// bias is weighted like the product). Null = none.
struct ExpertBiases {
  const void* w13 = nullptr;
  const void* w2 = nullptr;
};

// FP8 weights (W8A8): w13/w2 in e4m3 with one float32 scale per 128x128 block (dequantised = fp8 x scale, the
// `weight_scale_inv` of DeepSeek-V3/Qwen3-FP8 checkpoints); activations quantised on the fly per (row, 128-column
// group) to e4m3 with scale = amax / 448. Needs H and I multiples of 128 and bf16 activations.
constexpr int kFP8Block = 128;

struct Problem {
  int32_t tokens;        // T
  int32_t top_k;         // k
  int32_t num_experts;   // E (<= kMaxExperts)
  int32_t hidden;        // H
  int32_t intermediate;  // I
  DType dtype;           // activations and output
  bool fp8 = false;      // weights in e4m3 with 128x128 block scales
  Activation activation = Activation::kSiLU;
  int64_t rows() const { return int64_t(tokens) * top_k; }  // N = T*k (token, slot) pairs
};

// Choices made on the host from shapes only (never from routing counts, which would need a sync).
struct LaunchConfig {
  TileKind tiles;      // tile shapes (tile_config.h)
  bool fp8;
  int32_t num_chunks;  // pieces the T*k routing entries are split into by the plan kernels
  int32_t tile_rows() const { return moe::tile_rows(fp8, tiles); }
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
  void* intermediate;  // [N, I] SiLU(gate)·up, expert-sorted rows (e4m3 with FP8 weights)
  void* slot_out;      // [N, H] routing-weighted expert outputs, indexed by flat (token, slot)
  // FP8 only (null otherwise): x quantised once per token, and the scales of x and of the intermediate.
  void* x_fp8;             // [T, H] e4m3
  float* x_scale;          // [T, H/128]
  float* intermediate_scale;  // [N, I/128]
};

// FP8 weight scales, [E, 2I/128, H/128] for w13 and [E, H/128, I/128] for w2, float32.
struct WeightScales {
  const float* w13;
  const float* w2;
};

size_t workspace_bytes(const Problem& p);
Workspace carve_workspace(const Problem& p, void* base);

// Plan kernels (plan.cu). Also adds the per-expert counts into expert_load [E] int64 when it is not null.
cudaError_t build_plan(const Problem& p, const LaunchConfig& cfg, const int32_t* topk_ids, const Plan& plan,
                       int64_t* expert_load, cudaStream_t stream);

// The whole layer (moe_forward.cu): plan, GEMM1 (+ bias) + p.activation, GEMM2 (+ bias) x routing weight, combine
// into out [T, H].
cudaError_t forward(const Problem& p, const void* x, const void* w13, const void* w2, const float* topk_weights,
                    const int32_t* topk_ids, void* out, void* workspace, size_t workspace_size, int64_t* expert_load,
                    ExpertBiases biases, int device, cudaStream_t stream);

// The same layer with FP8 weights (p.fp8): x quantised per (token, 128 group), GEMM1 in e4m3 whose epilogue writes
// act(gate, up) (+ biases) quantised per (row, 128 group), GEMM2 in e4m3 (+ bias) x routing weight, combine. x, out
// and the biases are bf16.
cudaError_t forward_fp8(const Problem& p, const void* x, const void* w13, const void* w2, WeightScales scales,
                        const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                        size_t workspace_size, int64_t* expert_load, ExpertBiases biases, int device,
                        cudaStream_t stream);

}  // namespace staticmoe::moe
