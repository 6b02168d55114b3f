#pragma once
#include "moe/moe.h"

namespace staticmoe::moe {

// out[t] = Σ_s slot_out[t*k + s] (× topk_weights[t*k + s] when given: GEMM2 then wrote the rows unweighted).
cudaError_t combine(const Problem& p, const void* slot_out, const int32_t* topk_ids, const float* topk_weights,
                    void* out, cudaStream_t stream);

}  // namespace staticmoe::moe
