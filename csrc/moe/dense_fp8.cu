// Dense FP8 linear = quantize_rows_fp8 + the FP8 GEMM2 kernel with one expert. The GEMM reads its rows through a
// plan (task map, expert counts and offsets, sorted rows, routing weights); here that plan is trivial — one task of
// all rows, sorted_rows the identity, weights 1 (an exact multiply) — and a tiny kernel writes it into the
// workspace on the stream, so nothing depends on a host copy or a per-M cache and a graph replays it as is.
// Three launches, chained by PDL: plan (waits for the stream's previous kernel before writing: the workspace may be
// memory that kernel still reads), quantise (starts once the plan has waited, waits for it at its end), GEMM.
#include <cuda_bf16.h>

#include "common/pdl_launch.cuh"
#include "moe/dense_fp8.h"
#include "moe/moe.h"
#include "moe/quantize.h"
#include "moe/sm90_gemm.h"

namespace staticmoe::moe {
namespace {

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

struct DenseWorkspace {
  uint8_t* x_fp8;  // [rows, k] e4m3
  float* x_scale;  // [rows, k/128]
  Plan plan;       // one expert: counts [1], offsets [2], mtile_prefix [1], slot_expert [1], num_slots [1], sorted_rows [rows]
  float* ones;     // [rows] routing weights
};

// With base == nullptr the pointers are byte offsets; returns the total size.
size_t layout(int32_t rows, int32_t k, char* base, DenseWorkspace* ws) {
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* p = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(base) + off);
    off += align256(bytes);
    return p;
  };
  const size_t R = size_t(rows);
  DenseWorkspace w{};
  w.x_fp8 = reinterpret_cast<uint8_t*>(take(R * k));
  w.x_scale = reinterpret_cast<float*>(take(sizeof(float) * R * (k / kFP8Block)));
  int32_t* header = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * 6));
  w.plan.expert_counts = header;
  w.plan.expert_offsets = header + 1;  // [2]
  w.plan.mtile_prefix = header + 3;
  w.plan.slot_expert = header + 4;
  w.plan.num_slots = header + 5;
  w.plan.chunk_offsets = nullptr;  // the plan kernels' scratch: not used by the GEMM
  w.plan.expert_order = nullptr;
  w.plan.sorted_rows = reinterpret_cast<int32_t*>(take(sizeof(int32_t) * R));
  w.ones = reinterpret_cast<float*>(take(sizeof(float) * R));
  if (ws) *ws = w;
  return off;
}

constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads) dense_plan_kernel(int32_t rows, int32_t tile_rows, Plan plan,
                                                                  float* ones) {
  wait_for_predecessor();  // before any write: the previous kernel on the stream may still read this memory
  allow_dependents();      // the quantiser may start now; it waits for our completion before it ends
  const int32_t first = blockIdx.x * kPlanThreads + threadIdx.x;
  for (int32_t r = first; r < rows; r += gridDim.x * kPlanThreads) {
    plan.sorted_rows[r] = r;
    ones[r] = 1.f;
  }
  if (first == 0) {
    plan.expert_counts[0] = rows;
    plan.expert_offsets[0] = 0;
    plan.expert_offsets[1] = rows;
    plan.mtile_prefix[0] = (rows + tile_rows - 1) / tile_rows;
    plan.slot_expert[0] = 0;
    *plan.num_slots = 1;
  }
}

}  // namespace

size_t dense_fp8_workspace_bytes(int32_t rows, int32_t k) { return layout(rows, k, nullptr, nullptr); }

cudaError_t dense_fp8_linear(const void* x, const void* w, const float* w_scale, const void* bias, void* out,
                             int32_t rows, int32_t k, int32_t n, void* workspace, size_t workspace_size, int device,
                             cudaStream_t stream, int tiles) {
  if (rows < 0 || k <= 0 || k % kFP8Block || n <= 0 || n % 8 || tiles < -1 || tiles > 2) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (workspace_size < dense_fp8_workspace_bytes(rows, k)) return cudaErrorInvalidValue;
  DenseWorkspace ws;
  layout(rows, k, static_cast<char*>(workspace), &ws);
  // The MoE's chooser with every row on one expert: decode tiles up to 64 rows, 2-CTA clusters from 512.
  const Problem one_expert{rows, 1, 1, n, k, DType::kBF16, true};
  const TileKind kind = tiles >= 0 ? TileKind(tiles) : choose_config(one_expert).tiles;
  const int32_t blocks = (rows + kPlanThreads - 1) / kPlanThreads;
  cudaError_t err = launch_with_pdl(dense_plan_kernel, dim3(blocks < 1024 ? blocks : 1024), dim3(kPlanThreads), 0,
                                    stream, rows, tile_rows(true, kind), ws.plan, ws.ones);
  if (err != cudaSuccess) return err;
  err = quantize_rows_fp8(static_cast<const __nv_bfloat16*>(x), rows, k, ws.x_fp8, ws.x_scale, stream);
  if (err != cudaSuccess) return err;
  const DenseFp8Gemm gemm{ws.x_fp8, ws.x_scale, w, w_scale, bias, out, ws.ones, ws.plan, rows, k, n};
  return dense_gemm_fp8_sm90(gemm, kind, device, stream);
}

}  // namespace staticmoe::moe
