// Deterministic combine: out[t] = Σ_s slot_out[t*k + s] in fp32, slots in order, no atomics. GEMM2 already applied
// the routing weights; slots whose expert id is out of range were never written and are skipped.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/pdl_launch.cuh"
#include "moe/combine.h"

namespace staticmoe::moe {
namespace {

template <typename T>
__device__ __forceinline__ void add8(float (&acc)[8], const uint4& v) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] += static_cast<float>(e[i]);
}

// Slots are read in groups of kGroup: all of a group's expert ids first, then all of its rows, so a thread has
// kGroup independent 16-byte loads in flight instead of a chain of (id, row) round trips per slot (top-8 decode:
// one memory latency instead of eight). Slots still add in order, so the sum is the same as a serial loop's.
constexpr int kGroup = 8;

template <typename T>
__global__ void combine_kernel(const T* slot_out, const int32_t* topk_ids, T* out, int32_t tokens, int32_t top_k,
                               int32_t hidden, int32_t num_experts) {
  wait_for_predecessor();  // slot_out comes from GEMM2 (launched with PDL)
  const int64_t vecs_per_row = hidden / 8;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(tokens) * vecs_per_row) return;
  const int64_t t = i / vecs_per_row, c = (i % vecs_per_row) * 8;
  float acc[8] = {};
  for (int s0 = 0; s0 < top_k; s0 += kGroup) {
    bool routed[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int32_t e = s0 + j < top_k ? topk_ids[t * top_k + s0 + j] : -1;
      routed[j] = e >= 0 && e < num_experts;  // slots routed nowhere were never written
    }
    uint4 rows[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (routed[j]) rows[j] = *reinterpret_cast<const uint4*>(slot_out + (t * top_k + s0 + j) * hidden + c);
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
      if (routed[j]) add8<T>(acc, rows[j]);
  }
  alignas(16) T res[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) res[j] = static_cast<T>(acc[j]);
  *reinterpret_cast<uint4*>(out + t * hidden + c) = *reinterpret_cast<const uint4*>(res);
}

}  // namespace

cudaError_t combine(const Problem& p, const void* slot_out, const int32_t* topk_ids, void* out, cudaStream_t stream) {
  const int64_t threads = int64_t(p.tokens) * (p.hidden / 8);
  const int block = 256;
  const unsigned grid = unsigned((threads + block - 1) / block);
  if (p.dtype == DType::kBF16)
    return launch_with_pdl(combine_kernel<__nv_bfloat16>, grid, block, 0, stream,
                           static_cast<const __nv_bfloat16*>(slot_out), topk_ids, static_cast<__nv_bfloat16*>(out),
                           p.tokens, p.top_k, p.hidden, p.num_experts);
  return launch_with_pdl(combine_kernel<__half>, grid, block, 0, stream, static_cast<const __half*>(slot_out), topk_ids,
                         static_cast<__half*>(out), p.tokens, p.top_k, p.hidden, p.num_experts);
}

}  // namespace staticmoe::moe
