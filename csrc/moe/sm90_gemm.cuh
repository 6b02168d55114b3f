// The two grouped GEMMs of the MoE layer for sm_90a. One persistent, warp-specialised launch per GEMM: each CTA
// walks virtual tiles v = blockIdx.x, blockIdx.x + gridDim.x, ... and decodes them through the task map into
// (expert, M tile, N tile).
//   warpgroup 0 (producer, registers given away with setmaxnreg):
//     A (activations): rows gathered through the plan's sorted row index with 16-byte cp.async, written into shared
//                      memory in the 128-byte swizzle that wgmma reads (TMA cannot gather rows on sm_90);
//     B (weights):     TMA tile loads (SWIZZLE_128B);
//     both complete on the stage's `full` mbarrier (cp.async.mbarrier.arrive.noinc + transaction bytes).
//   warpgroups 1.. (math, one per 64 rows of the tile): wgmma m64nBNk16 (BN = 128 or 256), fp32 accumulators, one
//     wgmma group in flight; each stage is handed back through its `empty` mbarrier as soon as its wgmmas retire.
//   The producer runs up to kStages k-steps ahead across tile boundaries, so the next tile's loads overlap this
//   tile's last k-steps and its epilogue.
// Clusters (kCluster = 2, large experts): the two CTAs of a cluster take the two M halves of one 2·kBlockM-row
//   unit of the same expert and N tile, so they need the same weight tile: each loads half of it by TMA multicast
//   into both CTAs, halving the L2->SM weight traffic. A stage may then be refilled only when the consumers of
//   both CTAs have released it: each math warp arrives on the `empty` barrier of every CTA in the cluster. A CTA
//   whose half of the unit has no rows skips its MMAs but still takes part in the pipeline.
// GEMM1 (kGateUp): B tile = BN/2 gate rows + the matching BN/2 up rows of w13[e], so each thread holds gate and up of
//                  the same output column and the epilogue writes act(gate + b_g, up + b_u) to the expert-sorted
//                  intermediate; act is a template parameter (SiLU·up, or gpt-oss's clamped SwiGLU), the optional
//                  bias a uniform branch on a null pointer, staged in shared memory during the mainloop
//                  (tile_bias.cuh).
// GEMM2:           epilogue adds the optional bias, scales by the routing weight and writes bf16 rows to
//                  slot_out[token*k + slot].
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/pdl_launch.cuh"
#include "common/sm90_ptx.cuh"
#include "common/tile_clocks.cuh"
#include "common/wgmma_ops.cuh"
#include "moe/gemm_pipeline.cuh"
#include "moe/moe.h"
#include "moe/tile_bias.cuh"
#include "moe/tile_config.h"

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
  int32_t group_m;        // M tiles per raster group (see kGroupM)
  const T* bias;          // GEMM1: w13_bias [E, 2I] (gate, then up); GEMM2: w2_bias [E, H]; null = none
};

template <int kBlockM, int kBlockN, int kStages>
struct GemmSmem {
  static constexpr int kABytes = kBlockM * 128;
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBiasBytes = kBlockM / 16 * kBlockN * 2;  // one 16-bit bias slice per math warp (tile_bias.cuh)
  static constexpr int kBytes = kStages * kStageBytes + 2 * kStages * 8 + kBiasBytes + 1024;  // + barriers + slack
  static_assert(kBytes <= 227 * 1024, "more shared memory than an sm_90 block may opt into");
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

template <Activation kAct>
__device__ __forceinline__ float activate(float gate, float up) {
  if constexpr (kAct == Activation::kSiLU) {
    return silu(gate) * up;
  } else {
    static_assert(kAct == Activation::kSwigluOai);
    gate = fminf(gate, kSwigluOaiLimit);
    up = fminf(fmaxf(up, -kSwigluOaiLimit), kSwigluOaiLimit);
    return (up + 1.f) * gate / (1.f + __expf(-kSwigluOaiAlpha * gate));
  }
}

template <typename T, int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp>
__device__ __forceinline__ void produce(const CUtensorMap& weights, const GemmArgs<T>& args, uint8_t* smem,
                                        uint64_t* full, uint64_t* empty, int32_t total, int32_t num_slots,
                                        uint32_t cta_rank) {
  using Smem = GemmSmem<kBlockM, kBlockN, kStages>;
  constexpr int kRowsPerThread = kBlockM * 8 / kProducerThreads;  // 16-byte pieces: 8 per 128-byte row
  const int tid = threadIdx.x, piece = tid & 7;
  const int32_t k_iters = (args.k + kBlockK - 1) / kBlockK;
  int32_t chunk_hint = 0;
  uint32_t g = 0;  // k-steps loaded so far: stage g % kStages, pass g / kStages
  for (int32_t v = blockIdx.x / kCluster; v < total; v += gridDim.x / kCluster) {
    const TileWork w = decode_tile<kBlockM, kCluster>(args, v, num_slots, chunk_hint);
    const T* src[kRowsPerThread];
    uint32_t row_ok = 0;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = tid / 8 + i * (kProducerThreads / 8);
      int64_t src_row = 0;
      if (w.m0 + r < w.rows) {
        row_ok |= 1u << i;
        src_row = kGateUp ? args.sorted_rows[w.row_base + r] / args.top_k : w.row_base + r;
      }
      src[i] = args.a + src_row * args.k;
    }
    for (int32_t kt = 0; kt < k_iters; ++kt, ++g) {
      const int s = g % kStages;
      sm90::mbarrier_wait(&empty[s], ((g / kStages) & 1) ^ 1);  // a fresh barrier counts as released
      uint8_t* a_tile = smem + s * Smem::kStageBytes;
      uint8_t* b_tile = a_tile + Smem::kABytes;
      const int32_t k0 = kt * kBlockK;
      const bool k_ok = k0 + piece * 8 < args.k;
      if (w.m0 < w.rows) {  // an empty cluster half needs no A (its consumers skip the MMAs)
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const int r = tid / 8 + i * (kProducerThreads / 8);
          const bool ok = k_ok && (row_ok >> i & 1);
          sm90::cp_async_16(a_tile + sm90::swizzle128_offset(r, piece), ok ? src[i] + k0 + piece * 8 : args.a, ok);
        }
      }
      // The weight tile is two boxes of kBlockN/2 rows: GEMM1's gate | up rows, GEMM2's two halves of the N tile.
      if (tid == 0) load_weight_tile<kBlockN / 2, 2, kCluster, kGateUp>(weights, &full[s], b_tile, k0, w, cta_rank);
      sm90::cp_async_mbarrier_arrive_noinc(&full[s]);
    }
  }
  sm90::cp_async_wait<0>();  // keep the CTA (and its shared memory) alive until every gather has landed
}

template <typename T, int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, Activation kAct>
__device__ __forceinline__ void consume(const GemmArgs<T>& args, uint8_t* smem, uint64_t* full, uint64_t* empty,
                                        T* bias_slices, int32_t total, int32_t num_slots) {
  using Smem = GemmSmem<kBlockM, kBlockN, kStages>;
  using Bias = TileBias<T, kBlockN>;
  const int tid = threadIdx.x - kProducerThreads, warpgroup = tid / 128, lane = tid & 31, warp = (tid / 32) & 3;
  T* const bias_slice = bias_slices + (tid / 32) * kBlockN;
  const int32_t k_iters = (args.k + kBlockK - 1) / kBlockK;
  const bool recorder = blockIdx.x == 0 && tid == 0;  // probe builds only (common/tile_clocks.cuh)
  int taken = 0;
  int32_t chunk_hint = 0;
  uint32_t g = 0;  // k-steps consumed so far, in step with the producer
  for (int32_t v = blockIdx.x / kCluster; v < total; v += gridDim.x / kCluster, ++taken) {
    probe::tile_clock<kGateUp>(recorder, taken, probe::kTileStart);
    const TileWork w = decode_tile<kBlockM, kCluster>(args, v, num_slots, chunk_hint);
    probe::tile_clock<kGateUp>(recorder, taken, probe::kTileDecoded);
    if (kCluster > 1 && w.m0 >= w.rows) {  // nothing to compute: pass the stages through for the peer's sake
      g = pass_stages_through<kStages, kCluster>(full, empty, k_iters, g, lane);
      continue;
    }
    stage_tile_bias<kBlockN, kGateUp>(args, w, bias_slice, lane);
    float acc[kBlockN / 2];
    for (int32_t kt = 0; kt < k_iters; ++kt, ++g) {
      const int s = g % kStages;
      wait_stage<kStages, kGateUp>(full, g, kt, recorder, taken);
      sm90::fence_proxy_async_smem();  // the gathered A rows were written by cp.async (generic proxy)
      uint8_t* a_tile = smem + s * Smem::kStageBytes;
      const uint64_t da = sm90::smem_desc_k128_swizzle(a_tile + warpgroup * 64 * 128);
      const uint64_t db = sm90::smem_desc_k128_swizzle(a_tile + Smem::kABytes);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) wgmma_tile<T, kBlockN>(acc, da + 2 * kk, db + 2 * kk, kt > 0 || kk > 0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>();
      if (kt > 0) release_stage<kStages, kCluster>(empty, g - 1, lane);
    }
    sm90::wgmma_wait<0>();
    sm90::fence_accumulators(acc);
    release_stage<kStages, kCluster>(empty, g - 1, lane);
    probe::tile_clock<kGateUp>(recorder, taken, probe::kMainloopDone);

    // ---- epilogue: registers -> global, while the producer already loads the next tile ----------------------
    if (args.bias) Bias::add(acc, bias_slice, lane);  // in fp32, before the activation / routing weight
    const int r_lo = warpgroup * 64 + warp * 16 + lane / 4;
    const int col_in = 2 * (lane & 3);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r_lo + half * 8;
      if (w.m0 + r >= w.rows) continue;
      if constexpr (kGateUp) {
        T* dst = args.out + int64_t(w.row_base + r) * args.n_out;
        constexpr int kUp = kBlockN / 16;  // accumulator column groups of 8: gate in [0, kUp), up in [kUp, 2 kUp)
#pragma unroll
        for (int j = 0; j < kUp; ++j) {
          const int col = w.n_tile * (kBlockN / 2) + 8 * j + col_in;
          if (col >= args.n_out) continue;
          float g0 = acc[j * 4 + half * 2], g1 = acc[j * 4 + half * 2 + 1];
          float u0 = acc[(j + kUp) * 4 + half * 2], u1 = acc[(j + kUp) * 4 + half * 2 + 1];
          *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(activate<kAct>(g0, u0), activate<kAct>(g1, u1));
        }
      } else {
        const int32_t flat = args.sorted_rows[w.row_base + r];
        const float wt = args.topk_weights[flat];
        T* dst = args.out + int64_t(flat) * args.n_out;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          const int col = w.n_tile * kBlockN + 8 * j + col_in;
          if (col >= args.n_out) continue;
          const float y0 = acc[j * 4 + half * 2], y1 = acc[j * 4 + half * 2 + 1];
          *reinterpret_cast<uint32_t*>(dst + col) = pack2<T>(y0 * wt, y1 * wt);
        }
      }
    }
    probe::tile_clock<kGateUp>(recorder, taken, probe::kEpilogueDone);
  }
  probe::tiles_taken<kGateUp>(recorder, taken);
}

template <typename T, int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp,
          Activation kAct = Activation::kSiLU>
__global__ void __launch_bounds__(gemm_threads<kBlockM>(), 1)
    moe_gemm_sm90_kernel(const __grid_constant__ CUtensorMap weights, const GemmArgs<T> args) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto* full = reinterpret_cast<uint64_t*>(smem + kStages * GemmSmem<kBlockM, kBlockN, kStages>::kStageBytes);
  uint64_t* empty = full + kStages;
  T* bias_slices = reinterpret_cast<T*>(empty + kStages);  // [math warps][kBlockN]
  const PipelineStart start = start_pipeline<kBlockM, kStages, kCluster>(weights, args, full, empty);
  if (threadIdx.x < kProducerThreads) {
    become_producer<kBlockM>();
    produce<T, kBlockM, kBlockN, kStages, kCluster, kGateUp>(weights, args, smem, full, empty, start.total,
                                                              start.num_slots, start.cta_rank);
  } else {
    become_consumer<kBlockM>();
    consume<T, kBlockM, kBlockN, kStages, kCluster, kGateUp, kAct>(args, smem, full, empty, bias_slices, start.total,
                                                                   start.num_slots);
  }
  finish_pipeline<kCluster>();
}

}  // namespace staticmoe::moe
