// The two grouped GEMMs of the MoE layer with FP8 weights (e4m3, one float32 scale per 128x128 block) and e4m3
// activations (one scale per row and 128-column group), sm_90a. Same structure as sm90_gemm.cuh (the shared pieces
// are in gemm_pipeline.cuh) — persistent CTAs over the task map, a producer warpgroup gathering activation rows by
// cp.async and weights by TMA into a multi-stage pipeline, math warpgroups handing stages back through `empty`
// mbarriers — with these differences:
//   - A K step is 128 elements (one 128-byte swizzle row, exactly one scale block). Beside the A and B tiles each
//     stage holds the scale of every A row and of each 128-row half of the B tile (4-byte cp.async, completing on
//     the same `full` barrier).
//   - A is read from shared memory by the wgmmas (descriptors), once per 128-column half. (A from registers, a
//     K step as four pipelined m64n64 quarters and a one-MUFU SiLU were each measured slower or no faster on the
//     H100: benchmarks/NOTES.md "Session 25".)
//   - Promotion (DeepGEMM's recipe): wgmma m64n128k32 e4m3 accumulates one K block of one 128-column half into
//     `part`; after it retires, acc += part x a_scale[row] x b_scale[half] in fp32. WGMMA's own fp8 accumulation
//     keeps fewer bits than fp32, so it never carries a sum across K blocks. The two halves of a 256-wide tile take
//     turns on `part` (64 + 128 accumulator registers instead of 2 x 128); while one math warpgroup promotes, the
//     other's wgmmas keep the tensor cores busy.
//   - GEMM1 (kGateUp): B = 128 gate rows + the matching 128 up rows of w13[e], so a tile owns the 128 intermediate
//     columns of one scale group: the epilogue reduces each row's amax over the 4 lanes holding it (two shuffles,
//     no shared or global round trip) and writes act(gate + b_g, up + b_u) (the activation a template parameter,
//     the bf16 bias optional and staged in shared memory, as in sm90_gemm.cuh) as e4m3 plus its scale.
//   - GEMM2: adds the optional bias, scales by the routing weight and writes bf16 rows to slot_out[token*k + slot],
//     as the 16-bit GEMM.
#pragma once
#include "common/fp8_convert.cuh"
#include "common/tile_clocks.cuh"
#include "moe/sm90_gemm.cuh"

namespace staticmoe::moe {

struct Fp8GemmArgs {
  const uint8_t* a;          // GEMM1: x quantised [T, H]; GEMM2: intermediate [N, I] (e4m3)
  const float* a_scale;      // [rows of a, k / 128]
  const float* b_scale;      // [E, b_blocks, k / 128]
  void* out;                 // GEMM1: intermediate [N, I] e4m3; GEMM2: slot_out [N, H] bf16
  float* out_scale;          // GEMM1: intermediate scales [N, I / 128]; GEMM2: unused
  const float* topk_weights;
  const int32_t* expert_counts;
  const int32_t* expert_offsets;
  const int32_t* sorted_rows;
  TaskMap map;               // over M tiles of the non-empty experts
  int32_t k;                 // reduction size, a multiple of 128: H (GEMM1) or I (GEMM2)
  int32_t n_out;             // output columns: I (GEMM1) or H (GEMM2)
  int32_t n_tiles;           // N tiles per M tile
  int32_t top_k;
  int32_t group_m;           // M tiles per raster group
  int32_t b_blocks;          // 128-row scale blocks per expert matrix: 2I/128 (GEMM1) or H/128 (GEMM2)
  const __nv_bfloat16* bias;  // GEMM1: w13_bias [E, 2I] (gate, then up); GEMM2: w2_bias [E, H]; null = none
};

constexpr int kFp8BlockK = 128;    // elements per K step = bytes per swizzled row = one scale block

// Each math warp writes its 16 output rows through a staging tile of 16 rows x 128 bytes (+ 16 bytes of padding, so
// the fragment-layout writes hit distinct banks): GEMM2 64 bf16 columns at a time (store_rows_staged), GEMM1 its 128
// e4m3 columns (store_quantised_rows_staged). Rows then leave as 16-byte stores of 8 lanes: whole 32-byte sectors,
// where the fragment layout's stores covered 8 rows x 16 (GEMM2) or 8 (GEMM1) bytes per warp instruction.
constexpr int kOutStageCols = 64;
constexpr int kOutStageRowBytes = kOutStageCols * 2 + 16;

template <int kBlockM, int kBlockN, int kStages, bool kGateUp>
struct Fp8Smem {
  static constexpr int kABytes = kBlockM * 128;
  static constexpr int kBBytes = kBlockN * 128;
  static constexpr int kStageBytes = kABytes + kBBytes;          // multiples of 1024: the swizzle's alignment
  static constexpr int kScaleStride = (kBlockM + 2 + 3) / 4 * 4;  // floats per stage: A rows, then B halves
  static constexpr int kBiasBytes = kBlockM / 16 * kBlockN * 2;   // one bf16 bias slice per math warp (tile_bias.cuh)
  static constexpr int kOutBytes = kBlockM * kOutStageRowBytes;  // (kBlockM / 16) warps x 16 rows
  // After the stages: their scales, the kStages `full` and kStages `empty` barriers, the bias slices, the output
  // staging tiles and, for the posted-tile variant only, its ring of TileWork (last, so the default layout is the
  // same with or without it).
  static constexpr int kRingOffset = 2 * kStages * 8 + kBiasBytes + kOutBytes;  // bytes from `full`
  static constexpr int kRingBytes = kTileSlots<kStages> * int(sizeof(TileWork));
  static_assert((kStages * kScaleStride * 4 + kRingOffset) % alignof(TileWork) == 0, "the ring's TileWork alignment");
  template <bool kPosted>
  static constexpr int kBytes = kStages * kStageBytes + kStages * kScaleStride * 4 + 2 * kStages * 8 + kBiasBytes +
                                kOutBytes + (kPosted ? kRingBytes : 0) + 1024;
  static_assert(kBytes<true> <= 227 * 1024, "more shared memory than an sm_90 block may opt into");
  static __device__ __forceinline__ TileWork* tile_ring(uint64_t* full) {
    return reinterpret_cast<TileWork*>(reinterpret_cast<uint8_t*>(full) + kRingOffset);
  }
};

// kTmaA (GEMM2 only, whose A rows are contiguous: GEMM1 wrote them in expert order): A's tile comes as one TMA box
// from `acts` instead of 8 cp.async per producer thread, so the producer issues ~130 instructions a K step, not
// ~1,150 (benchmarks/wgmma_rate.cu: a producer's cp.async compete with the promotion FMAs for issue slots).
template <int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, bool kPost, bool kTmaA>
__device__ __forceinline__ void produce_fp8(const CUtensorMap& weights, const CUtensorMap& acts,
                                            const Fp8GemmArgs& args, uint8_t* smem, float* scales, uint64_t* full,
                                            uint64_t* empty, int32_t total, int32_t num_slots, uint32_t cta_rank) {
  static_assert(!(kTmaA && kGateUp), "GEMM1 gathers its A rows; only GEMM2's are contiguous");
  using Smem = Fp8Smem<kBlockM, kBlockN, kStages, kGateUp>;
  constexpr int kRowsPerThread = kBlockM * 8 / kProducerThreads;  // 16-byte pieces: 8 per 128-byte row
  constexpr int kHalves = kBlockN / 128;
  const int tid = threadIdx.x, piece = tid & 7;
  const int32_t k_iters = args.k / kFp8BlockK;
  int32_t chunk_hint = 0;
  uint32_t g = 0;  // k-steps loaded so far: stage g % kStages, pass g / kStages
  if (kTmaA && tid == 0) sm90::prefetch_tensor_map(&acts);
  for (int32_t v = blockIdx.x / kCluster; v < total; v += gridDim.x / kCluster) {
    const TileWork w = decode_tile<kBlockM, kCluster>(args, v, num_slots, chunk_hint);
    if (kPost && tid == 0) post_tile<kStages, kCluster>(Smem::tile_ring(full), v, w);  // for take_tile
    auto source_row = [&](int r) -> int64_t {  // row of `a` holding tile row r
      return kGateUp ? args.sorted_rows[w.row_base + r] / args.top_k : w.row_base + r;
    };
    int32_t src_row[kRowsPerThread];  // 32-bit row indices, not pointers: the producer has kProducerRegs
    uint32_t row_ok = 0;
#pragma unroll
    for (int i = 0; i < (kTmaA ? 0 : kRowsPerThread); ++i) {
      const int r = tid / 8 + i * (kProducerThreads / 8);
      const bool ok = w.m0 + r < w.rows;
      row_ok |= uint32_t(ok) << i;
      src_row[i] = ok ? int32_t(source_row(r)) : 0;
    }
    // Thread r < kBlockM copies row r's scale; threads 0..kHalves-1 the B halves' scales.
    const bool scale_row_ok = tid < kBlockM && w.m0 + tid < w.rows;
    const float* a_scale = args.a_scale + (scale_row_ok ? source_row(tid) * k_iters : 0);
    const float* b_scale = args.b_scale;
    if (tid < kHalves) {
      const int32_t block = kGateUp ? tid * (args.n_out / 128) + w.n_tile : w.n_tile * kHalves + tid;
      b_scale += (int64_t(w.expert) * args.b_blocks + min(block, args.b_blocks - 1)) * k_iters;
    }
    for (int32_t kt = 0; kt < k_iters; ++kt, ++g) {
      const int s = g % kStages;
      sm90::mbarrier_wait(&empty[s], ((g / kStages) & 1) ^ 1);  // a fresh barrier counts as released
      uint8_t* a_tile = smem + s * Smem::kStageBytes;
      uint8_t* b_tile = a_tile + Smem::kABytes;
      float* stage_scales = scales + s * Smem::kScaleStride;
      const int32_t k0 = kt * kFp8BlockK;
      if (w.m0 < w.rows) {  // an empty cluster half needs no A (its consumers skip the MMAs)
        if constexpr (kTmaA) {
          // Rows past the tile's end are the next expert's (or zeros past the tensor): computed, never stored; their
          // scales are zero-filled below. Thread 0's arrival comes later, in load_weight_tile.
          if (tid == 0) {
            sm90::mbarrier_expect_tx(&full[s], kBlockM * 128);
            sm90::tma_load_3d(a_tile, &acts, &full[s], k0, w.row_base, 0);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) {
            const int r = tid / 8 + i * (kProducerThreads / 8);
            const bool ok = row_ok >> i & 1;
            const uint8_t* src = args.a + int64_t(src_row[i]) * args.k + k0 + piece * 16;
            sm90::cp_async_16(a_tile + sm90::swizzle128_offset(r, piece), ok ? src : args.a, ok);
          }
        }
        if (tid < kBlockM) sm90::cp_async_4(stage_scales + tid, scale_row_ok ? a_scale + kt : args.a_scale, scale_row_ok);
        if (tid < kHalves) sm90::cp_async_4(stage_scales + kBlockM + tid, b_scale + kt, true);
      }
      // Boxes of 128 rows (one scale block): GEMM1's gate | up rows, GEMM2's halves of the N tile (one box when
      // kBlockN is 128).
      if (tid == 0) load_weight_tile<128, kHalves, kCluster, kGateUp>(weights, &full[s], b_tile, k0, w, cta_rank);
      sm90::cp_async_mbarrier_arrive_noinc(&full[s]);
    }
  }
  sm90::cp_async_wait<0>();  // keep the CTA (and its shared memory) alive until every gather has landed
}

// GEMM1's epilogue for one row: h = act(gate, up) over the tile's 128 columns (32 per lane of the row's quad; the
// biases are already in acc), quantised with the quad's amax into the row's 128 bytes of the staging tile; all lanes
// call it (the shuffles need the whole warp). The scale goes to `scale_dst` unless it is null (a row past the end).
template <Activation kAct>
__device__ __forceinline__ void quantise_row_to_stage(const float (&acc)[128], int half, uint8_t* dst,
                                                      float* scale_dst, int lane) {
  float h[32];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    h[2 * j] = activate<kAct>(acc[j * 4 + half * 2], acc[(j + 16) * 4 + half * 2]);
    h[2 * j + 1] = activate<kAct>(acc[j * 4 + half * 2 + 1], acc[(j + 16) * 4 + half * 2 + 1]);
    amax = fmaxf(amax, fmaxf(fabsf(h[2 * j]), fabsf(h[2 * j + 1])));
  }
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float scale = fp8::group_scale(amax), inv = __frcp_rn(scale);
#pragma unroll
  for (int j = 0; j < 16; ++j)
    *reinterpret_cast<uint16_t*>(dst + 8 * j + 2 * (lane & 3)) = fp8::quantize2_by_inverse(h[2 * j], h[2 * j + 1], inv);
  if ((lane & 3) == 0 && scale_dst) *scale_dst = scale;
}

// GEMM1's epilogue for one math warp's 16 rows (warp_row0 .. warp_row0 + 15 of the tile) through the warp's staging
// tile: each row's 128 e4m3 bytes leave as 8 lanes' 16-byte stores (rows are consecutive in the sorted order). From
// the fragments a warp store covered 8 rows x 8 bytes; this took GEMM1 -5% (T=8192) to -8% (T=32768) on the H100.
template <Activation kAct>
__device__ __forceinline__ void store_quantised_rows_staged(const float (&acc)[128], const Fp8GemmArgs& args,
                                                            const TileWork& w, int warp_row0, uint8_t* stage,
                                                            int lane) {
  __syncwarp();  // the previous tile's reads of the staging tile are done in every lane
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp_row0 + lane / 4 + half * 8;
    const bool row_ok = w.m0 + r < w.rows;
    const int64_t row = w.row_base + r;
    quantise_row_to_stage<kAct>(acc, half, stage + (lane / 4 + half * 8) * kOutStageRowBytes,
                                row_ok ? args.out_scale + row * (args.n_out / 128) + w.n_tile : nullptr, lane);
  }
  __syncwarp();
  const int seg = lane & 7, pass_row = lane >> 3;  // 8 lanes x 16 bytes = one 128-byte row
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = pass_row + 4 * i;
    if (w.m0 + warp_row0 + r >= w.rows) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(stage + r * kOutStageRowBytes + 16 * seg);
    uint8_t* dst = static_cast<uint8_t*>(args.out) + (w.row_base + warp_row0 + r) * int64_t(args.n_out);
    *reinterpret_cast<uint4*>(dst + w.n_tile * 128 + 16 * seg) = v;
  }
}

// GEMM2's epilogue for one math warp's 16 rows (warp_row0 .. warp_row0 + 15 of the tile): scale by the routing
// weight and write bf16 rows to slot_out[sorted_rows[...]]. From the fragments a warp store covers 16 bytes of each
// of 8 rows (half of every 32-byte sector); through a [16 x 64] staging tile in shared memory each row leaves as
// 16-byte stores of 8 lanes: whole sectors, a quarter of the store instructions. n_out is a multiple of 8.
template <int kBlockN>
__device__ __forceinline__ void store_rows_staged(const float (&acc)[kBlockN / 2], const Fp8GemmArgs& args,
                                                  const TileWork& w, int warp_row0, uint8_t* stage, int lane) {
  const int row = warp_row0 + (lane & 15);  // lanes i and i + 16 look up row i: both loads in flight at once
  const bool ok = w.m0 + row < w.rows;
  const int32_t flat = ok ? args.sorted_rows[w.row_base + row] : -1;
  const float wt = ok ? args.topk_weights[flat] : 0.f;
  const float wt_lo = __shfl_sync(0xffffffffu, wt, lane / 4), wt_hi = __shfl_sync(0xffffffffu, wt, lane / 4 + 8);
  const int seg = lane & 7, pass_row = lane >> 3;  // reads: 8 lanes x 16 bytes = 128 bytes of one row
  int32_t dst_row[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) dst_row[i] = __shfl_sync(0xffffffffu, flat, pass_row + 4 * i);
  uint8_t* const lo = stage + (lane / 4) * kOutStageRowBytes + 4 * (lane & 3);
  uint8_t* const hi = lo + 8 * kOutStageRowBytes;
#pragma unroll
  for (int chunk = 0; chunk < kBlockN / kOutStageCols; ++chunk) {
    const int32_t col0 = w.n_tile * kBlockN + chunk * kOutStageCols;
    if (col0 >= args.n_out) break;  // uniform
#pragma unroll
    for (int jj = 0; jj < kOutStageCols / 8; ++jj) {
      const int j = chunk * (kOutStageCols / 8) + jj;
      *reinterpret_cast<uint32_t*>(lo + 16 * jj) = pack2<__nv_bfloat16>(acc[j * 4] * wt_lo, acc[j * 4 + 1] * wt_lo);
      *reinterpret_cast<uint32_t*>(hi + 16 * jj) = pack2<__nv_bfloat16>(acc[j * 4 + 2] * wt_hi, acc[j * 4 + 3] * wt_hi);
    }
    __syncwarp();
    const int32_t col = col0 + 8 * seg;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (dst_row[i] < 0 || col >= args.n_out) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(stage + (pass_row + 4 * i) * kOutStageRowBytes + 16 * seg);
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(args.out) + int64_t(dst_row[i]) * args.n_out + col) = v;
    }
    __syncwarp();  // the next chunk overwrites the staging tile
  }
}

// acc[offset ..] += part x (row scale): one K block's wgmma result promoted into the fp32 accumulators. In the
// m64nN fragment, registers 4j and 4j + 1 belong to the thread's first row, 4j + 2 and 4j + 3 to its row + 8.
template <int kN, int kAcc>
__device__ __forceinline__ void promote(float (&acc)[kAcc], const float (&part)[kN], int offset, float s_lo,
                                        float s_hi) {
#pragma unroll
  for (int j = 0; j < kN / 4; ++j) {
    acc[offset + j * 4 + 0] = fmaf(part[j * 4 + 0], s_lo, acc[offset + j * 4 + 0]);
    acc[offset + j * 4 + 1] = fmaf(part[j * 4 + 1], s_lo, acc[offset + j * 4 + 1]);
    acc[offset + j * 4 + 2] = fmaf(part[j * 4 + 2], s_hi, acc[offset + j * 4 + 2]);
    acc[offset + j * 4 + 3] = fmaf(part[j * 4 + 3], s_hi, acc[offset + j * 4 + 3]);
  }
}

template <int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, Activation kAct, bool kPosted>
__device__ __forceinline__ void consume_fp8(const Fp8GemmArgs& args, uint8_t* smem, const float* scales,
                                            uint64_t* full, uint64_t* empty, __nv_bfloat16* bias_slices,
                                            uint8_t* out_stage, int32_t total, int32_t num_slots) {
  using Smem = Fp8Smem<kBlockM, kBlockN, kStages, kGateUp>;
  using Bias = TileBias<__nv_bfloat16, kBlockN>;
  constexpr int kHalves = kBlockN / 128;
  static_assert(!kGateUp || kHalves == 2, "GEMM1 tiles hold 128 gate and 128 up rows: one output scale group");
  const int tid = threadIdx.x - kProducerThreads, warpgroup = tid / 128, lane = tid & 31, warp = (tid / 32) & 3;
  const int r_lo = warpgroup * 64 + warp * 16 + lane / 4;  // this thread's rows: r_lo and r_lo + 8
  __nv_bfloat16* const bias_slice = bias_slices + (tid / 32) * kBlockN;
  const int32_t k_iters = args.k / kFp8BlockK;
  const bool recorder = blockIdx.x == 0 && tid == 0;  // probe builds only (common/tile_clocks.cuh)
  int taken = 0;
  int32_t chunk_hint = 0;
  uint32_t g = 0;  // k-steps consumed so far, in step with the producer
  for (int32_t v = blockIdx.x / kCluster; v < total; v += gridDim.x / kCluster, ++taken) {
    probe::tile_clock<kGateUp>(recorder, taken, probe::kTileStart);
    // kPosted: the producer's TileWork, after the first stage's wait (the probe's "decode" then includes that wait)
    const TileWork w = kPosted ? take_tile<kStages, kCluster>(Smem::tile_ring(full), full, v, g)
                               : decode_tile<kBlockM, kCluster>(args, v, num_slots, chunk_hint);
    probe::tile_clock<kGateUp>(recorder, taken, probe::kTileDecoded);
    if (kCluster > 1 && w.m0 >= w.rows) {  // nothing to compute: pass the stages through for the peer's sake
      g = pass_stages_through<kStages, kCluster>(full, empty, k_iters, g, lane);
      continue;
    }
    stage_tile_bias<kBlockN, kGateUp>(args, w, bias_slice, lane);
    float acc[kHalves * 64];
#pragma unroll
    for (int i = 0; i < kHalves * 64; ++i) acc[i] = 0.f;
    float part[64];  // one m64n128 partial set, for each half in turn
    for (int32_t kt = 0; kt < k_iters; ++kt, ++g) {
      const int s = g % kStages;
      wait_stage<kStages, kGateUp>(full, g, kt, recorder, taken);
      sm90::fence_proxy_async_smem();  // the gathered A rows were written by cp.async (generic proxy)
      const float* stage_scales = scales + s * Smem::kScaleStride;
      const float a_lo = stage_scales[r_lo], a_hi = stage_scales[r_lo + 8];
      float b[kHalves];
#pragma unroll
      for (int h = 0; h < kHalves; ++h) b[h] = stage_scales[kBlockM + h];
      uint8_t* a_tile = smem + s * Smem::kStageBytes;
      const uint64_t da = sm90::smem_desc_k128_swizzle(a_tile + warpgroup * 64 * 128);
      const uint64_t db = sm90::smem_desc_k128_swizzle(a_tile + Smem::kABytes);
#pragma unroll
      for (int h = 0; h < kHalves; ++h) {
        sm90::fence_accumulators(part);
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kFp8BlockK / 32; ++kk)  // 32 bytes of K per instruction: descriptor + 2
          sm90::wgmma_m64n128k32_e4m3(part, da + 2 * kk, db + h * (128 * 128 >> 4) + 2 * kk, kk > 0);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_accumulators(part);
        // After the last half, every read of this stage (scales included) is done.
        if (h == kHalves - 1) release_stage<kStages, kCluster>(empty, g, lane);
        promote(acc, part, h * 64, a_lo * b[h], a_hi * b[h]);
      }
    }

    probe::tile_clock<kGateUp>(recorder, taken, probe::kMainloopDone);

    // ---- epilogue: registers -> global, while the producer already loads the next tile ----------------------
    if (args.bias) Bias::add(acc, bias_slice, lane);  // in fp32, before the activation / routing weight
    uint8_t* const stage = out_stage + (tid / 32) * 16 * kOutStageRowBytes;
    if constexpr (kGateUp) {
      store_quantised_rows_staged<kAct>(acc, args, w, warpgroup * 64 + warp * 16, stage, lane);
    } else {
      store_rows_staged<kBlockN>(acc, args, w, warpgroup * 64 + warp * 16, stage, lane);
    }
    probe::tile_clock<kGateUp>(recorder, taken, probe::kEpilogueDone);
  }
  probe::tiles_taken<kGateUp>(recorder, taken);
}

// kPosted: the producer posts each tile's TileWork to a ring in shared memory and the math warps take it
// (take_tile) instead of decoding the task map themselves (STATICMOE_FP8_POSTED_TILES, sm90_gemm.cu). kTmaA: GEMM2's
// A tile by TMA from `acts` (a 3-D map {k, rows, 1} of args.a; unused otherwise).
template <int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, Activation kAct = Activation::kSiLU,
          bool kPosted = false, bool kTmaA = false>
__global__ void __launch_bounds__(gemm_threads<kBlockM>(), 1)
    moe_gemm_fp8_sm90_kernel(const __grid_constant__ CUtensorMap weights, const __grid_constant__ CUtensorMap acts,
                             const Fp8GemmArgs args) {
  static_assert(kCluster == 1 || kBlockN == 256, "each CTA of a pair multicasts one of the two 128-row boxes");
  using Smem = Fp8Smem<kBlockM, kBlockN, kStages, kGateUp>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* scales = reinterpret_cast<float*>(smem + kStages * Smem::kStageBytes);
  auto* full = reinterpret_cast<uint64_t*>(scales + kStages * Smem::kScaleStride);
  uint64_t* empty = full + kStages;
  auto* bias_slices = reinterpret_cast<__nv_bfloat16*>(empty + kStages);  // [math warps][kBlockN]
  uint8_t* out_stage = reinterpret_cast<uint8_t*>(bias_slices) + Smem::kBiasBytes;  // [math warps][16 rows]
  // The task map's totals: read once before the warpgroups split, except in the posted-tile variant, whose producer
  // is short of registers: there each warpgroup reads them after setmaxnreg (a value live across it is spilled).
  PipelineStart start{};
  if constexpr (kPosted) {
    init_pipeline<kBlockM, kStages, kCluster>(weights, full, empty);
    wait_for_predecessor();
  } else {
    start = start_pipeline<kBlockM, kStages, kCluster>(weights, args, full, empty);
  }
  auto totals = [&]() -> PipelineStart {
    if constexpr (!kPosted) return start;
    const TaskTiles tiles = task_tiles(args);
    return {kCluster > 1 ? sm90::cluster_cta_rank() : 0u, tiles.num_slots, tiles.total};
  };
  if (threadIdx.x < kProducerThreads) {
    become_producer<kBlockM>();
    const PipelineStart s = totals();
    produce_fp8<kBlockM, kBlockN, kStages, kCluster, kGateUp, kPosted, kTmaA>(weights, acts, args, smem, scales,
                                                                             full, empty, s.total, s.num_slots,
                                                                             s.cta_rank);
  } else {
    become_consumer<kBlockM>();
    const PipelineStart s = totals();
    consume_fp8<kBlockM, kBlockN, kStages, kCluster, kGateUp, kAct, kPosted>(args, smem, scales, full, empty,
                                                                             bias_slices, out_stage, s.total,
                                                                             s.num_slots);
  }
  finish_pipeline<kCluster>();
}

}  // namespace staticmoe::moe
