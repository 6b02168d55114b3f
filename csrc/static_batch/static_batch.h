// Host API of the generic static-batching framework: build a task map on the device, and a batched GEMM whose
// tasks each have their own M, N and K (the framework's non-MoE workload). Raw pointers only, no torch.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace staticmoe {

// tile_counts [num_tasks] on the device -> tile_prefix/slot_task [num_tasks], num_slots [1] on the device.
cudaError_t build_task_map(const int32_t* tile_counts, int32_t num_tasks, int32_t* tile_prefix, int32_t* slot_task,
                           int32_t* num_slots, cudaStream_t stream);

// Test entry: out[3v .. 3v+2] = (slot, task, tile) of every virtual tile v < num_tiles, by the warp decoder.
cudaError_t decode_all_tiles(const int32_t* tile_prefix, const int32_t* slot_task, const int32_t* num_slots,
                             int32_t num_tiles, int32_t* out, cudaStream_t stream);

// One task of the varlen batched GEMM: C[M, N] = A[M, K] · B[N, K]ᵀ, row-major, bf16 in/out, fp32 accumulate.
struct VarlenGemmTask {
  int64_t a, b, c;  // device addresses
  int32_t m, n, k, pad;
};

// Workspace bytes for `num_tasks` tasks (task map + tile counts).
size_t varlen_gemm_workspace_bytes(int32_t num_tasks);
// tasks: device array [num_tasks]. One launch covers every task's tiles; empty tasks cost nothing.
cudaError_t varlen_gemm_bf16(const VarlenGemmTask* tasks, int32_t num_tasks, void* workspace, int device,
                             cudaStream_t stream);

}  // namespace staticmoe
