// The MoE layer end to end: workspace layout, launch configuration and the four stages on the caller's stream.
// Nothing here synchronises with the host or allocates device memory, so the layer is CUDA-graph capturable.
#include <climits>

#include "common/env_knob.h"
#include "moe/combine.h"
#include "moe/moe.h"
#include "moe/quantize.h"
#include "moe/sm90_gemm.h"

namespace staticmoe::moe {
namespace {

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }
constexpr int kMaxChunks = 256;
constexpr int64_t kEntriesPerChunk = 1024;

// Walks the workspace layout once; with base == nullptr it measures and yields offsets.
size_t layout(const Problem& p, const LaunchConfig& cfg, char* base, Workspace* ws) {
  size_t off = 0;
  auto take = [&](size_t bytes) {  // with base == nullptr the pointers are byte offsets
    char* ptr = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(base) + off);
    off += align256(bytes);
    return ptr;
  };
  const size_t E = p.num_experts, N = size_t(p.rows()), T = size_t(p.tokens), elem = 2;
  Plan plan;
  plan.expert_counts = reinterpret_cast<int32_t*>(take(4 * E));
  plan.expert_offsets = reinterpret_cast<int32_t*>(take(4 * (E + 1)));
  plan.chunk_offsets = reinterpret_cast<int32_t*>(take(4 * E * cfg.num_chunks));
  plan.expert_order = reinterpret_cast<int32_t*>(take(4 * E));
  plan.mtile_prefix = reinterpret_cast<int32_t*>(take(4 * E));
  plan.slot_expert = reinterpret_cast<int32_t*>(take(4 * E));
  plan.num_slots = reinterpret_cast<int32_t*>(take(4));
  plan.sorted_rows = reinterpret_cast<int32_t*>(take(4 * N));
  void* intermediate = take((p.fp8 ? 1 : elem) * N * p.intermediate);
  void* slot_out = take(elem * N * p.hidden);
  void *x_fp8 = nullptr, *x_scale = nullptr, *intermediate_scale = nullptr;
  if (p.fp8) {
    x_fp8 = take(T * p.hidden);
    x_scale = take(sizeof(float) * T * (p.hidden / kFP8Block));
    intermediate_scale = take(sizeof(float) * N * (p.intermediate / kFP8Block));
  }
  if (ws)
    *ws = Workspace{plan, intermediate, slot_out, x_fp8, static_cast<float*>(x_scale),
                    static_cast<float*>(intermediate_scale)};
  return off;
}

// Expected rows per expert from which two CTAs share weight tiles (a lone M tile would leave its peer idle).
// STATICMOE_CLUSTER_MIN_ROWS overrides it for tuning probes (0: never).
int64_t cluster_min_rows() {
  static const int64_t rows = [] {
    const int64_t r = env_knob("STATICMOE_CLUSTER_MIN_ROWS", kClusterMinRows, 0);
    return r > 0 ? r : INT64_MAX;
  }();
  return rows;
}

}  // namespace

LaunchConfig choose_config(const Problem& p) {
  LaunchConfig cfg;
  const int64_t rows_per_expert = p.rows() / p.num_experts;  // expected under balanced routing; shapes only
  cfg.tiles = choose_tile_kind(rows_per_expert, cluster_min_rows());
  cfg.fp8 = p.fp8;
  const int64_t chunks = p.rows() <= kSingleBlockPlanEntries ? 1 : (p.rows() + kEntriesPerChunk - 1) / kEntriesPerChunk;
  cfg.num_chunks = int32_t(chunks < 1 ? 1 : (chunks > kMaxChunks ? kMaxChunks : chunks));
  return cfg;
}

size_t workspace_bytes(const Problem& p) { return layout(p, choose_config(p), nullptr, nullptr); }

Workspace carve_workspace(const Problem& p, void* base) {
  Workspace ws;
  layout(p, choose_config(p), static_cast<char*>(base), &ws);
  return ws;
}

bool valid(const Problem& p) {
  if (p.num_experts < 1 || p.num_experts > kMaxExperts || p.top_k < 1 || p.hidden % 8 || p.intermediate % 8)
    return false;
  if (p.activation != Activation::kSiLU && p.activation != Activation::kSwigluOai) return false;
  return !p.fp8 || (p.dtype == DType::kBF16 && p.hidden % kFP8Block == 0 && p.intermediate % kFP8Block == 0);
}

cudaError_t forward(const Problem& p, const void* x, const void* w13, const void* w2, const float* topk_weights,
                    const int32_t* topk_ids, void* out, void* workspace, size_t workspace_size, int64_t* expert_load,
                    ExpertBiases biases, int device, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (p.fp8 || !valid(p)) return cudaErrorInvalidValue;
  if (workspace_size < workspace_bytes(p)) return cudaErrorInvalidValue;
  const LaunchConfig cfg = choose_config(p);
  const Workspace ws = carve_workspace(p, workspace);
  cudaError_t err = build_plan(p, cfg, topk_ids, ws.plan, expert_load, stream);
  if (err != cudaSuccess) return err;
  if ((err = grouped_gemms_sm90(p, cfg, x, w13, w2, topk_weights, biases, ws, device, stream)) != cudaSuccess)
    return err;
  return combine(p, ws.slot_out, topk_ids, out, stream);
}

cudaError_t forward_fp8(const Problem& p, const void* x, const void* w13, const void* w2, WeightScales scales,
                        const float* topk_weights, const int32_t* topk_ids, void* out, void* workspace,
                        size_t workspace_size, int64_t* expert_load, ExpertBiases biases, int device,
                        cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (!p.fp8 || !valid(p) || workspace_size < workspace_bytes(p)) return cudaErrorInvalidValue;
  const LaunchConfig cfg = choose_config(p);
  const Workspace ws = carve_workspace(p, workspace);
  cudaError_t err = build_plan(p, cfg, topk_ids, ws.plan, expert_load, stream);
  if (err != cudaSuccess) return err;
  // Once per token, not per slot; it needs no plan, so it runs beside the one-block plan (which lets it start).
  err = quantize_rows_fp8(static_cast<const __nv_bfloat16*>(x), p.tokens, p.hidden, static_cast<uint8_t*>(ws.x_fp8),
                          ws.x_scale, stream);
  if (err != cudaSuccess) return err;
  if ((err = grouped_gemms_fp8_sm90(p, cfg, w13, w2, scales, topk_weights, biases, ws, device, stream)) !=
      cudaSuccess)
    return err;
  return combine(p, ws.slot_out, topk_ids, out, stream);
}

}  // namespace staticmoe::moe
