// A dense block-scaled FP8 linear (the attention projections, shared experts and dense MLPs of an FP8 checkpoint) on
// the MoE layer's FP8 GEMM2 kernel: one expert to which every row is routed (E = 1, top_k = 1). Raw device pointers,
// sizes and the caller's stream; no torch, no host sync, no allocation: CUDA-graph capturable.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace staticmoe::moe {

// Scratch of one call: x quantised ([rows, k] e4m3 + [rows, k/128] float32 scales) and the one-expert plan.
size_t dense_fp8_workspace_bytes(int32_t rows, int32_t k);

// out [rows, n] bf16 = quantise(x [rows, k] bf16) · dequantise(w [n, k] e4m3, w_scale [ceil(n/128), k/128])ᵀ
// (+ bias [n] bf16, null = none), all row-major and contiguous. x is quantised per (row, 128 columns) with
// scale = amax / 448, the rule of quantize_rows_fp8. Needs k a positive multiple of 128 and n a positive multiple
// of 8 (the epilogue stores column pairs; the staged bias copies 4-byte pairs); rows >= 0.
// Tiles: the MoE's chooser with every row on one expert (choose_config), unless `tiles` names a TileKind (0 decode,
// 1 large, 2 large with 2-CTA clusters): an override for benchmarks that time each kind; -1 = choose.
cudaError_t dense_fp8_linear(const void* x, const void* w, const float* w_scale, const void* bias, void* out,
                             int32_t rows, int32_t k, int32_t n, void* workspace, size_t workspace_size, int device,
                             cudaStream_t stream, int tiles = -1);

}  // namespace staticmoe::moe
