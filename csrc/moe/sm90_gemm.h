// Launches GEMM1 (gathered x · w13ᵀ (+ bias), activation epilogue) then GEMM2 (intermediate · w2ᵀ (+ bias) x
// routing weight).
#pragma once
#include "moe/moe.h"

namespace staticmoe::moe {

cudaError_t grouped_gemms_sm90(const Problem& p, const LaunchConfig& cfg, const void* x, const void* w13,
                               const void* w2, const float* topk_weights, ExpertBiases biases, const Workspace& ws,
                               int device, cudaStream_t stream);

// FP8 weights: GEMM1 reads ws.x_fp8 / ws.x_scale and writes the e4m3 intermediate and its scales.
cudaError_t grouped_gemms_fp8_sm90(const Problem& p, const LaunchConfig& cfg, const void* w13, const void* w2,
                                   WeightScales scales, const float* topk_weights, ExpertBiases biases,
                                   const Workspace& ws, int device, cudaStream_t stream);

// The FP8 GEMM2 kernel as a dense block-scaled linear (dense_fp8.cu): out [rows, n] bf16 = a · wᵀ (+ bias) with
// a [rows, k] e4m3 + a_scale [rows, k/128], w [n, k] e4m3 + w_scale [ceil(n/128), k/128], bias [n] bf16 or null.
// `plan` is one expert of all `rows` (sorted_rows the identity) counted in tiles of tile_rows(true, tiles), and
// `ones` [rows] its routing weights.
struct DenseFp8Gemm {
  const uint8_t* a;
  const float* a_scale;
  const void* w;
  const float* w_scale;
  const void* bias;
  void* out;
  const float* ones;
  Plan plan;
  int32_t rows, k, n;
};
cudaError_t dense_gemm_fp8_sm90(const DenseFp8Gemm& g, TileKind tiles, int device, cudaStream_t stream);

// A probe build's per-tile clocks (common/tile_clocks.cuh) of the last GEMM1 and GEMM2 launches: `clocks` gets
// 2 x tile_clock_slots() values ([gemm][tile][event]), `taken` the tiles each recorder took. Returns
// cudaErrorNotSupported in a normal build.
int tile_clock_slots();
cudaError_t read_tile_clocks(unsigned long long* clocks, int* taken);

}  // namespace staticmoe::moe
