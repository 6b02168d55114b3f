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

}  // namespace staticmoe::moe
