// The two grouped GEMMs of the MoE layer for sm_90a. One persistent launch per GEMM: each CTA walks virtual tiles
// v = blockIdx.x, blockIdx.x + gridDim.x, ... and decodes them through the task map into (expert, M tile, N tile).
//   A (activations): rows gathered through the plan's sorted row index with 16-byte cp.async, written into shared
//                    memory in the 128-byte swizzle that wgmma reads (TMA cannot gather rows);
//   B (weights):     TMA tile loads (SWIZZLE_128B) completing on an mbarrier per stage;
//   math:            wgmma m64nBNk16 (BN = 128 or 256), fp32 accumulators, one warpgroup per 64 rows of the tile;
//   pipeline:        kStages shared-memory stages, loads kStages-2 k-steps ahead, one wgmma group in flight.
// GEMM1 (kGateUp): B tile = BN/2 gate rows + the matching BN/2 up rows of w13[e], so each thread holds gate and up of
//                  the same output column and the epilogue writes SiLU(gate)·up to the expert-sorted intermediate.
// GEMM2:           epilogue scales by the routing weight and writes bf16 rows to slot_out[token*k + slot].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/sm90_ptx.cuh"
#include "common/wgmma_ops.cuh"
#include "moe/moe.h"
#include "static_batch/task_map.h"

namespace staticmoe::moe {

constexpr int kBlockK = 64;  // one 128-byte swizzle row of bf16/fp16

template <typename T>
struct GemmArgs {
  const T* a;             // GEMM1: x [T, H]; GEMM2: intermediate [N, I]
  T* out;                 // GEMM1: intermediate [N, I]; GEMM2: slot_out [N, H]
  const float* topk_weights;
  const int32_t* expert_counts;
  const int32_t* expert_offsets;
  const int32_t* sorted_rows;
  TaskMap map;            // over M tiles of the non-empty experts
  int32_t k;              // reduction size: H (GEMM1) or I (GEMM2)
  int32_t n_out;          // output columns: I (GEMM1) or H (GEMM2)
  int32_t n_tiles;        // N tiles per M tile
  int32_t top_k;
};

template <int kBlockM, int kBlockN, int kStages>
struct GemmSmem {
  static constexpr int kABytes = kBlockM * 128;
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBytes = kStages * kStageBytes + kStages * 8 + 1024;  // + barriers + alignment slack
};

template <typename T, int N>
__device__ __forceinline__ void wgmma_tile(float (&acc)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 256) {
    if constexpr (bf16) sm90::wgmma_m64n256k16_bf16(acc, da, db, scale_d);
    else sm90::wgmma_m64n256k16_f16(acc, da, db, scale_d);
  } else {
    static_assert(N == 128);
    if constexpr (bf16) sm90::wgmma_m64n128k16_bf16(acc, da, db, scale_d);
    else sm90::wgmma_m64n128k16_f16(acc, da, db, scale_d);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

template <typename T, int kBlockM, int kBlockN, int kStages, bool kGateUp>
__global__ void __launch_bounds__(kBlockM * 2, 1)
    moe_gemm_sm90_kernel(const __grid_constant__ CUtensorMap weights, const GemmArgs<T> args) {
  using Smem = GemmSmem<kBlockM, kBlockN, kStages>;
  constexpr int kThreads = kBlockM * 2;
  constexpr int kRowsPerThread = 4;  // kBlockM rows x 8 pieces / kThreads
  static_assert(kBlockM * 8 == kThreads * kRowsPerThread);
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto* full = reinterpret_cast<uint64_t*>(smem + kStages * Smem::kStageBytes);
  auto a_stage = [&](int s) { return smem + s * Smem::kStageBytes; };
  auto b_stage = [&](int s) { return smem + s * Smem::kStageBytes + Smem::kABytes; };

  const int tid = threadIdx.x, warpgroup = tid / 128, lane = tid & 31, warp_in_group = (tid / 32) & 3;
  if (tid == 0) {
    sm90::prefetch_tensor_map(&weights);
    for (int s = 0; s < kStages; ++s) sm90::mbarrier_init(&full[s], 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int32_t num_slots = *args.map.num_slots;
  const int32_t total = task_map_total_tiles(args.map.tile_prefix, num_slots) * args.n_tiles;
  const int32_t k_iters = (args.k + kBlockK - 1) / kBlockK;
  const int piece = tid & 7;  // this thread's 16-byte piece of every row it loads
  int32_t chunk_hint = 0;
  uint32_t g = 0;  // k-steps issued by this CTA so far: stage = g % kStages, barrier parity = (g / kStages) & 1

  for (int32_t v = blockIdx.x; v < total; v += gridDim.x) {
    // ---- decode: v / n_tiles is an M tile of the map; the remainder picks the N tile ------------------------
    const TileCoord tc = task_map_decode_warp(args.map, v / args.n_tiles, num_slots, chunk_hint);
    const int32_t expert = tc.task;
    const int32_t rows = args.expert_counts[expert];
    const int32_t m_tiles = (rows + kBlockM - 1) / kBlockM;
    // The expert's tiles are numbered local = 0 .. m_tiles*n_tiles-1; M runs fastest so that CTAs running at the
    // same time share one weight tile through L2.
    const int32_t local = tc.tile * args.n_tiles + v % args.n_tiles;
    const int32_t m_tile = local % m_tiles;
    const int32_t n_tile = local / m_tiles;
    const int32_t m0 = m_tile * kBlockM;
    const int32_t row_base = args.expert_offsets[expert] + m0;

    const T* src[kRowsPerThread];
    bool row_ok[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = tid / 8 + i * (kThreads / 8);
      row_ok[i] = m0 + r < rows;
      int64_t src_row = 0;
      if (row_ok[i]) src_row = kGateUp ? args.sorted_rows[row_base + r] / args.top_k : row_base + r;
      src[i] = args.a + src_row * args.k;
    }
    auto load = [&](uint32_t step, int32_t kt) {
      const int s = step % kStages;
      const int32_t k0 = kt * kBlockK;
      const bool k_ok = k0 + piece * 8 < args.k;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = tid / 8 + i * (kThreads / 8);
        const bool ok = row_ok[i] && k_ok;
        sm90::cp_async_16(a_stage(s) + sm90::swizzle128_offset(r, piece), ok ? src[i] + k0 + piece * 8 : args.a, ok);
      }
      if (tid == 0) {
        sm90::mbarrier_arrive_expect_tx(&full[s], Smem::kBBytes);
        if constexpr (kGateUp) {
          const int n0 = n_tile * (kBlockN / 2);
          sm90::tma_load_3d(b_stage(s), &weights, &full[s], k0, n0, 2 * expert);
          sm90::tma_load_3d(b_stage(s) + (kBlockN / 2) * 128, &weights, &full[s], k0, n0, 2 * expert + 1);
        } else {
          sm90::tma_load_3d(b_stage(s), &weights, &full[s], k0, n_tile * kBlockN, expert);
        }
      }
    };

    // ---- main loop -----------------------------------------------------------------------------------------
    float acc[kBlockN / 2];
#pragma unroll
    for (int s = 0; s < kStages - 2; ++s) {
      if (s < k_iters) load(g + s, s);
      sm90::cp_async_commit();
    }
    for (int32_t kt = 0; kt < k_iters; ++kt) {
      const uint32_t step = g + kt;
      const int s = step % kStages;
      sm90::cp_async_wait<kStages - 3>();
      sm90::fence_proxy_async_smem();
      sm90::mbarrier_wait(&full[s], (step / kStages) & 1);
      __syncthreads();  // A pieces of all threads landed; every warpgroup finished the wgmma of step-2
      if (kt + kStages - 2 < k_iters) load(step + kStages - 2, kt + kStages - 2);
      sm90::cp_async_commit();
      const uint64_t da = sm90::smem_desc_k128_swizzle(a_stage(s) + warpgroup * 64 * 128);
      const uint64_t db = sm90::smem_desc_k128_swizzle(b_stage(s));
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) wgmma_tile<T, kBlockN>(acc, da + 2 * kk, db + 2 * kk, kt > 0 || kk > 0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>();
    }
    sm90::wgmma_wait<0>();
    sm90::fence_accumulators(acc);
    g += k_iters;

    // ---- epilogue: registers -> global ------------------------------------------------------------------------
    const int r_lo = warpgroup * 64 + warp_in_group * 16 + lane / 4;
    const int col_in = 2 * (lane & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r_lo + half * 8;
      if (m0 + r >= rows) continue;
      if constexpr (kGateUp) {
        T* dst = args.out + int64_t(row_base + r) * args.n_out;
        constexpr int kUp = kBlockN / 16;  // accumulator column groups of 8: gate in [0, kUp), up in [kUp, 2 kUp)
#pragma unroll
        for (int j = 0; j < kUp; ++j) {
          const int col = n_tile * (kBlockN / 2) + 8 * j + col_in;
          const float h0 = silu(acc[j * 4 + half * 2]) * acc[(j + kUp) * 4 + half * 2];
          const float h1 = silu(acc[j * 4 + half * 2 + 1]) * acc[(j + kUp) * 4 + half * 2 + 1];
          if (col < args.n_out) *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(h0, h1);
        }
      } else {
        const int32_t flat = args.sorted_rows[row_base + r];
        const float w = args.topk_weights[flat];
        T* dst = args.out + int64_t(flat) * args.n_out;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          const int col = n_tile * kBlockN + 8 * j + col_in;
          if (col < args.n_out)
            *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(acc[j * 4 + half * 2] * w, acc[j * 4 + half * 2 + 1] * w);
        }
      }
    }
    __syncthreads();  // the next tile's first loads overwrite stages this tile's wgmmas may still be reading
  }
}

}  // namespace staticmoe::moe
