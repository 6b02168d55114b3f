#pragma once
#include "moe/moe.h"

namespace staticmoe::moe {

cudaError_t combine(const Problem& p, const void* slot_out, const int32_t* topk_ids, void* out, cudaStream_t stream);

}  // namespace staticmoe::moe
