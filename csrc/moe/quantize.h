// Quantises activation rows to e4m3 per (row, 128-column group) (rule: common/fp8_convert.cuh).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace staticmoe::moe {

// x [rows, cols] bf16 -> q [rows, cols] e4m3, scale [rows, cols / 128] float32. cols must be a multiple of 128.
cudaError_t quantize_rows_fp8(const __nv_bfloat16* x, int32_t rows, int32_t cols, uint8_t* q, float* scale,
                              cudaStream_t stream);

}  // namespace staticmoe::moe
