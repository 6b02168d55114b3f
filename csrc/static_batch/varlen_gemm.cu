// The framework's second workload: a batch of GEMMs where every task has its own M, N and K. One launch: each
// persistent CTA walks virtual tiles, decodes (task, tile) through the task map, and computes a 64x64 tile with
// SIMT fp32 FMAs (this workload proves the mapping; the tensor-core path lives in moe/).
#include <cuda_bf16.h>

#include "static_batch/static_batch.h"
#include "static_batch/task_map.h"

namespace staticmoe {
namespace {

constexpr int kTile = 64, kChunk = 32, kThreads = 256;

__global__ void varlen_tile_counts_kernel(const VarlenGemmTask* tasks, int32_t num_tasks, int32_t* tile_counts) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= num_tasks) return;
  const VarlenGemmTask t = tasks[i];
  const bool empty = t.m <= 0 || t.n <= 0;
  tile_counts[i] = empty ? 0 : ((t.m + kTile - 1) / kTile) * ((t.n + kTile - 1) / kTile);
}

__global__ void __launch_bounds__(kThreads) varlen_gemm_kernel(const VarlenGemmTask* tasks, TaskMap map) {
  __shared__ float a_s[kChunk][kTile + 1];  // [k][m], padded against bank conflicts
  __shared__ float b_s[kChunk][kTile + 1];  // [k][n]
  const int32_t num_slots = *map.num_slots;
  const int32_t total = task_map_total_tiles(map.tile_prefix, num_slots);
  int32_t chunk_hint = 0;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // each thread: 4x4 outputs
  for (int32_t v = blockIdx.x; v < total; v += gridDim.x) {
    const TileCoord tc = task_map_decode_warp(map, v, num_slots, chunk_hint);
    const VarlenGemmTask t = tasks[tc.task];
    const int n_tiles = (t.n + kTile - 1) / kTile;
    const int m0 = (tc.tile / n_tiles) * kTile, n0 = (tc.tile % n_tiles) * kTile;
    const auto* A = reinterpret_cast<const __nv_bfloat16*>(t.a);
    const auto* B = reinterpret_cast<const __nv_bfloat16*>(t.b);
    float acc[4][4] = {};
    for (int k0 = 0; k0 < t.k; k0 += kChunk) {
      for (int i = threadIdx.x; i < kTile * kChunk; i += kThreads) {
        const int r = i / kChunk, kk = i % kChunk;
        const bool kin = k0 + kk < t.k;
        a_s[kk][r] = (m0 + r < t.m && kin) ? __bfloat162float(A[int64_t(m0 + r) * t.k + k0 + kk]) : 0.f;
        b_s[kk][r] = (n0 + r < t.n && kin) ? __bfloat162float(B[int64_t(n0 + r) * t.k + k0 + kk]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kChunk; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = a_s[kk][ty * 4 + i], b[i] = b_s[kk][tx * 4 + i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    auto* C = reinterpret_cast<__nv_bfloat16*>(t.c);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = m0 + ty * 4 + i, c = n0 + tx * 4 + j;
        if (r < t.m && c < t.n) C[int64_t(r) * t.n + c] = __float2bfloat16(acc[i][j]);
      }
  }
}

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

}  // namespace

size_t varlen_gemm_workspace_bytes(int32_t num_tasks) { return 3 * align256(sizeof(int32_t) * (num_tasks + 1)); }

cudaError_t varlen_gemm_bf16(const VarlenGemmTask* tasks, int32_t num_tasks, void* workspace, int device,
                             cudaStream_t stream) {
  if (num_tasks <= 0) return cudaSuccess;
  auto* base = static_cast<char*>(workspace);
  const size_t part = align256(sizeof(int32_t) * (num_tasks + 1));
  auto* tile_counts = reinterpret_cast<int32_t*>(base);
  auto* tile_prefix = reinterpret_cast<int32_t*>(base + part);
  auto* slot_task = reinterpret_cast<int32_t*>(base + 2 * part);
  int32_t* num_slots = tile_counts + num_tasks;  // the spare last entry
  varlen_tile_counts_kernel<<<(num_tasks + 255) / 256, 256, 0, stream>>>(tasks, num_tasks, tile_counts);
  cudaError_t err = build_task_map(tile_counts, num_tasks, tile_prefix, slot_task, num_slots, stream);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  varlen_gemm_kernel<<<sms * 4, kThreads, 0, stream>>>(tasks, TaskMap{tile_prefix, slot_task, num_slots});
  return cudaGetLastError();
}

}  // namespace staticmoe
