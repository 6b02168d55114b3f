// Host side of the grouped GEMMs: tensor maps for the weights, the persistent grid, the two launches of each
// tile kind and precision (tile shapes: tile_config.h), and FP8 GEMM2 alone as a dense linear (dense_fp8.cu).
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <utility>

#include "common/env_knob.h"
#include "moe/sm90_gemm.cuh"
#include "moe/sm90_gemm_fp8.cuh"
#include "moe/sm90_gemm.h"

namespace staticmoe::moe {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver entry point is looked up at first use, so importing the extension needs no GPU or libcuda link.
cudaError_t encode_tiled_fn(EncodeTiled* fn) {
  static EncodeTiled cached = nullptr;
  static cudaError_t status = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    if (status == cudaSuccess && q != cudaDriverEntryPointSuccess) status = cudaErrorSymbolNotFound;
    cached = reinterpret_cast<EncodeTiled>(p);
  });
  *fn = cached;
  return status;
}

// 3-D map {k (contiguous), rows, batch} with a {128 bytes, box_rows, 1} box in the 128-byte swizzle. A weight tile
// is loaded as two boxes of half its rows (gate and up for w13; two halves for w2), so a cluster of two CTAs can
// multicast one box each.
cudaError_t make_weight_map(CUtensorMap* map, const void* base, CUtensorMapDataType type, int elem_bytes, int64_t k,
                            int64_t rows, int64_t batch, uint32_t box_rows) {
  EncodeTiled encode;
  if (cudaError_t err = encode_tiled_fn(&encode); err != cudaSuccess) return err;
  const cuuint64_t dims[3] = {cuuint64_t(k), cuuint64_t(rows), cuuint64_t(batch)};
  const cuuint64_t strides[2] = {cuuint64_t(k) * elem_bytes, cuuint64_t(k * rows) * elem_bytes};
  const cuuint32_t box[3] = {cuuint32_t(128 / elem_bytes), box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, type, 3, const_cast<void*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Tensor maps of w13 (viewed as 2E matrices [I, H]: gate of expert e is matrix 2e, up is 2e+1) and w2 [E, H, I].
cudaError_t weight_maps(const Problem& p, int block_n1, int block_n2, const void* w13, const void* w2,
                        CUtensorMap* w13_map, CUtensorMap* w2_map) {
  const CUtensorMapDataType type = p.fp8 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : p.dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                             : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const int elem = p.fp8 ? 1 : 2;
  // 16-bit tiles are always two boxes of half the tile; FP8 boxes are 128 rows (one scale block), one or two.
  const uint32_t box1 = p.fp8 ? 128 : block_n1 / 2, box2 = p.fp8 ? 128 : block_n2 / 2;
  cudaError_t err = make_weight_map(w13_map, w13, type, elem, p.hidden, p.intermediate, 2 * int64_t(p.num_experts),
                                    box1);
  if (err != cudaSuccess) return err;
  return make_weight_map(w2_map, w2, type, elem, p.intermediate, p.hidden, p.num_experts, box2);
}

// Once per kernel and device: the shared-memory opt-in and the persistent grid (CTAs that fit at once). Each
// kernel instantiation passes its own `grid_per_device` cache.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int threads, int smem, int cluster, int device, cudaStream_t stream,
                            int (&grid_per_device)[64], int* grid_out) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (grid_per_device[device] == 0) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    int sms = 0, per_sm = 0;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem)) != cudaSuccess) return err;
    grid_per_device[device] = sms * (per_sm > 0 ? per_sm : 1);
    if (cluster > 1) {  // clusters live inside one GPC: fewer may fit than SMs / cluster
      PdlLaunch probe(dim3(grid_per_device[device] / cluster * cluster), threads, smem, stream, cluster);
      int clusters = 0;
      if ((err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &probe.config)) != cudaSuccess) return err;
      grid_per_device[device] = cluster * (clusters > 0 ? clusters : 1);
    }
  }
  *grid_out = grid_per_device[device];
  return cudaSuccess;
}

template <typename T, int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp,
          Activation kAct = Activation::kSiLU>
cudaError_t launch(const CUtensorMap& map, const GemmArgs<T>& args, int device, cudaStream_t stream) {
  auto kernel = moe_gemm_sm90_kernel<T, kBlockM, kBlockN, kStages, kCluster, kGateUp, kAct>;
  constexpr int kSmem = GemmSmem<kBlockM, kBlockN, kStages>::kBytes;
  static int grid_per_device[64] = {};
  int grid;
  if (cudaError_t err =
          persistent_grid(kernel, gemm_threads<kBlockM>(), kSmem, kCluster, device, stream, grid_per_device, &grid);
      err != cudaSuccess)
    return err;
  return launch_cluster_with_pdl(kernel, grid, gemm_threads<kBlockM>(), kSmem, kCluster, stream, map, args);
}

template <int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, Activation kAct, bool kPosted,
          bool kTmaA>
cudaError_t launch_fp8_variant(const CUtensorMap& map, const CUtensorMap& acts, const Fp8GemmArgs& args, int device,
                               cudaStream_t stream) {
  auto kernel = moe_gemm_fp8_sm90_kernel<kBlockM, kBlockN, kStages, kCluster, kGateUp, kAct, kPosted, kTmaA>;
  using Smem = Fp8Smem<kBlockM, kBlockN, kStages, kGateUp>;
  constexpr int kSmem = Smem::template kBytes<kPosted>;
  static int grid_per_device[64] = {};
  int grid;
  if (cudaError_t err =
          persistent_grid(kernel, gemm_threads<kBlockM>(), kSmem, kCluster, device, stream, grid_per_device, &grid);
      err != cudaSuccess)
    return err;
  return launch_cluster_with_pdl(kernel, grid, gemm_threads<kBlockM>(), kSmem, kCluster, stream, map, acts, args);
}

// Posted tiles (moe_gemm_fp8_sm90_kernel's kPosted) for a 128-row GEMM2 with K <= kFp8PostedMaxK, where a tile has
// few K steps: the default (STATICMOE_FP8_POSTED_TILES=0 turns it off for A/B runs). Never with no K step (k < 128,
// which the op refuses anyway): a posted tile is taken at its first K step's barrier.
bool posted_tiles(int32_t k) {
  static const bool on = env_knob("STATICMOE_FP8_POSTED_TILES", 1, 0) != 0;
  return on && k >= kFp8BlockK && k <= kFp8PostedMaxK;
}

// GEMM2's A tile by TMA (moe_gemm_fp8_sm90_kernel's kTmaA) when STATICMOE_FP8_TMA_A=1: opt-in until a GPU run has
// checked and timed it.
bool tma_a() {
  static const bool on = env_knob("STATICMOE_FP8_TMA_A", 0, 0) != 0;
  return on;
}

// Only GEMM2's large tiles (128 rows) have the posted variant: GEMM1's was slower at every shape measured. `acts`:
// GEMM2's A as a TMA map (a3_map); GEMM1 passes any map (unused).
template <int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp, Activation kAct = Activation::kSiLU>
cudaError_t launch_fp8(const CUtensorMap& map, const CUtensorMap& acts, const Fp8GemmArgs& args, int device,
                       cudaStream_t stream) {
  if constexpr (!kGateUp) {
    const bool posted = kBlockM == 128 && posted_tiles(args.k);
    if (tma_a()) {
      if (posted)
        return launch_fp8_variant<kBlockM, kBlockN, kStages, kCluster, false, kAct, kBlockM == 128, true>(
            map, acts, args, device, stream);
      return launch_fp8_variant<kBlockM, kBlockN, kStages, kCluster, false, kAct, false, true>(map, acts, args,
                                                                                              device, stream);
    }
    if (posted)
      return launch_fp8_variant<kBlockM, kBlockN, kStages, kCluster, false, kAct, kBlockM == 128, false>(
          map, acts, args, device, stream);
  }
  return launch_fp8_variant<kBlockM, kBlockN, kStages, kCluster, kGateUp, kAct, false, false>(map, acts, args, device,
                                                                                             stream);
}

// GEMM2's activations [rows, k] e4m3 as a 3-D TMA map with kBlockM-row boxes (kTmaA).
cudaError_t a3_map(CUtensorMap* map, const void* a, int64_t rows, int64_t k, int block_m) {
  return make_weight_map(map, a, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, k, rows, 1, uint32_t(block_m));
}

// Raster group size: kGroupM, or STATICMOE_RASTER_GROUP_M{1,2} (GEMM1 / GEMM2) for tuning probes.
int32_t raster_group(const char* env_name) { return int32_t(env_knob(env_name, kGroupM, 1)); }

// Both GEMMs of one tile kind and precision, with the Tiles<> of tile_config.h.
template <TileKind kKind, typename T>
cudaError_t run_gemms(const Problem& p, const T* x, const void* w13, const void* w2, const float* topk_weights,
                      ExpertBiases biases, const Workspace& ws, int device, cudaStream_t stream) {
  using Cfg = Tiles<false, kKind>;
  const Plan& plan = ws.plan;
  const TaskMap map{plan.mtile_prefix, plan.slot_expert, plan.num_slots};
  CUtensorMap w13_map, w2_map;
  cudaError_t err = weight_maps(p, Cfg::kBlockN1, Cfg::kBlockN2, w13, w2, &w13_map, &w2_map);
  if (err != cudaSuccess) return err;
  static const int32_t group1 = raster_group("STATICMOE_RASTER_GROUP_M1");
  static const int32_t group2 = raster_group("STATICMOE_RASTER_GROUP_M2");
  const int n_tiles1 = (p.intermediate + Cfg::kBlockN1 / 2 - 1) / (Cfg::kBlockN1 / 2);
  const int n_tiles2 = (p.hidden + Cfg::kBlockN2 - 1) / Cfg::kBlockN2;
  GemmArgs<T> g1{x, static_cast<T*>(ws.intermediate), topk_weights, plan.expert_counts, plan.expert_offsets,
                 plan.sorted_rows, map, p.hidden, p.intermediate, n_tiles1, p.top_k, group1,
                 static_cast<const T*>(biases.w13)};
  if (p.activation == Activation::kSwigluOai)
    err = launch<T, Cfg::kBlockM, Cfg::kBlockN1, Cfg::kStages, Cfg::kCluster, true, Activation::kSwigluOai>(
        w13_map, g1, device, stream);
  else
    err = launch<T, Cfg::kBlockM, Cfg::kBlockN1, Cfg::kStages, Cfg::kCluster, true>(w13_map, g1, device, stream);
  if (err != cudaSuccess) return err;
  GemmArgs<T> g2{static_cast<const T*>(ws.intermediate), static_cast<T*>(ws.slot_out), topk_weights,
                 plan.expert_counts, plan.expert_offsets, plan.sorted_rows, map, p.intermediate, p.hidden, n_tiles2,
                 p.top_k, group2, static_cast<const T*>(biases.w2)};
  return launch<T, Cfg::kBlockM, Cfg::kBlockN2, Cfg::kStages, Cfg::kCluster, false>(w2_map, g2, device, stream);
}

template <TileKind kKind>
cudaError_t run_gemms_fp8(const Problem& p, const void* w13, const void* w2, WeightScales scales,
                          const float* topk_weights, ExpertBiases biases, const Workspace& ws, int device,
                          cudaStream_t stream) {
  using Cfg = Tiles<true, kKind>;
  const Plan& plan = ws.plan;
  const TaskMap map{plan.mtile_prefix, plan.slot_expert, plan.num_slots};
  CUtensorMap w13_map, w2_map;
  cudaError_t err = weight_maps(p, Cfg::kBlockN1, Cfg::kBlockN2, w13, w2, &w13_map, &w2_map);
  if (err != cudaSuccess) return err;
  static const int32_t group1 = raster_group("STATICMOE_RASTER_GROUP_M1");
  static const int32_t group2 = raster_group("STATICMOE_RASTER_GROUP_M2");
  const int n_tiles1 = p.intermediate / 128;  // 128 output columns (one scale group) per tile
  const int n_tiles2 = (p.hidden + Cfg::kBlockN2 - 1) / Cfg::kBlockN2;
  Fp8GemmArgs g1{static_cast<const uint8_t*>(ws.x_fp8), ws.x_scale, scales.w13, ws.intermediate,
                 ws.intermediate_scale, topk_weights, plan.expert_counts, plan.expert_offsets, plan.sorted_rows, map,
                 p.hidden, p.intermediate, n_tiles1, p.top_k, group1, 2 * p.intermediate / kFP8Block,
                 static_cast<const __nv_bfloat16*>(biases.w13)};
  if (p.activation == Activation::kSwigluOai)
    err = launch_fp8<Cfg::kBlockM, Cfg::kBlockN1, Cfg::kStages, Cfg::kCluster, true, Activation::kSwigluOai>(
        w13_map, w13_map, g1, device, stream);
  else
    err = launch_fp8<Cfg::kBlockM, Cfg::kBlockN1, Cfg::kStages, Cfg::kCluster, true>(w13_map, w13_map, g1, device,
                                                                                      stream);
  if (err != cudaSuccess) return err;
  CUtensorMap acts2 = w2_map;  // unused unless TMA-A is on: encoding a map costs host time on every launch
  if (tma_a() && (err = a3_map(&acts2, ws.intermediate, p.rows(), p.intermediate, Cfg::kBlockM)) != cudaSuccess)
    return err;
  Fp8GemmArgs g2{static_cast<const uint8_t*>(ws.intermediate), ws.intermediate_scale, scales.w2, ws.slot_out,
                 nullptr, topk_weights, plan.expert_counts, plan.expert_offsets, plan.sorted_rows, map,
                 p.intermediate, p.hidden, n_tiles2, p.top_k, group2, p.hidden / kFP8Block,
                 static_cast<const __nv_bfloat16*>(biases.w2)};
  return launch_fp8<Cfg::kBlockM, Cfg::kBlockN2, Cfg::kStages, Cfg::kCluster, false>(w2_map, acts2, g2, device,
                                                                                    stream);
}

// GEMM2's instantiation of each tile kind with one expert matrix [n, k] (rows past n read as zeros by TMA; the
// scale row of a wholly out-of-range half is clamped by the producer, its columns masked by the epilogue).
template <TileKind kKind>
cudaError_t run_dense_gemm_fp8(const DenseFp8Gemm& d, int device, cudaStream_t stream) {
  using Cfg = Tiles<true, kKind>;
  CUtensorMap w_map;
  cudaError_t err = make_weight_map(&w_map, d.w, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, d.k, d.n, 1, kFP8Block);
  if (err != cudaSuccess) return err;
  CUtensorMap a_map = w_map;  // unused unless TMA-A is on
  if (tma_a() && (err = a3_map(&a_map, d.a, d.rows, d.k, Cfg::kBlockM)) != cudaSuccess) return err;
  static const int32_t group2 = raster_group("STATICMOE_RASTER_GROUP_M2");
  const TaskMap map{d.plan.mtile_prefix, d.plan.slot_expert, d.plan.num_slots};
  const int n_tiles = (d.n + Cfg::kBlockN2 - 1) / Cfg::kBlockN2;
  const Fp8GemmArgs g{d.a, d.a_scale, d.w_scale, d.out, nullptr, d.ones, d.plan.expert_counts,
                      d.plan.expert_offsets, d.plan.sorted_rows, map, d.k, d.n, n_tiles, 1, group2,
                      (d.n + kFP8Block - 1) / kFP8Block, static_cast<const __nv_bfloat16*>(d.bias)};
  return launch_fp8<Cfg::kBlockM, Cfg::kBlockN2, Cfg::kStages, Cfg::kCluster, false>(w_map, a_map, g, device,
                                                                                    stream);
}

template <typename T>
cudaError_t dispatch(const Problem& p, const LaunchConfig& cfg, const T* x, const void* w13, const void* w2,
                     const float* topk_weights, ExpertBiases b, const Workspace& ws, int device, cudaStream_t stream) {
  switch (cfg.tiles) {
    case TileKind::kDecode: return run_gemms<TileKind::kDecode>(p, x, w13, w2, topk_weights, b, ws, device, stream);
    case TileKind::kLarge: return run_gemms<TileKind::kLarge>(p, x, w13, w2, topk_weights, b, ws, device, stream);
    case TileKind::kLargeCluster:
      return run_gemms<TileKind::kLargeCluster>(p, x, w13, w2, topk_weights, b, ws, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t grouped_gemms_sm90(const Problem& p, const LaunchConfig& cfg, const void* x, const void* w13,
                               const void* w2, const float* topk_weights, ExpertBiases biases, const Workspace& ws,
                               int device, cudaStream_t stream) {
  if (p.dtype == DType::kBF16)
    return dispatch(p, cfg, static_cast<const __nv_bfloat16*>(x), w13, w2, topk_weights, biases, ws, device, stream);
  return dispatch(p, cfg, static_cast<const __half*>(x), w13, w2, topk_weights, biases, ws, device, stream);
}

cudaError_t grouped_gemms_fp8_sm90(const Problem& p, const LaunchConfig& cfg, const void* w13, const void* w2,
                                   WeightScales scales, const float* topk_weights, ExpertBiases biases,
                                   const Workspace& ws, int device, cudaStream_t stream) {
  switch (cfg.tiles) {
    case TileKind::kDecode:
      return run_gemms_fp8<TileKind::kDecode>(p, w13, w2, scales, topk_weights, biases, ws, device, stream);
    case TileKind::kLarge:
      return run_gemms_fp8<TileKind::kLarge>(p, w13, w2, scales, topk_weights, biases, ws, device, stream);
    case TileKind::kLargeCluster:
      return run_gemms_fp8<TileKind::kLargeCluster>(p, w13, w2, scales, topk_weights, biases, ws, device, stream);
  }
  return cudaErrorInvalidValue;
}

int tile_clock_slots() { return probe::kProbedTiles * probe::kTileEvents; }

cudaError_t read_tile_clocks(unsigned long long* clocks, int* taken) {
#ifdef STATICMOE_TILE_CLOCKS
  cudaError_t err = cudaMemcpyFromSymbol(clocks, probe::g_tile_clocks, sizeof(probe::g_tile_clocks));
  return err != cudaSuccess ? err : cudaMemcpyFromSymbol(taken, probe::g_tiles_taken, sizeof(probe::g_tiles_taken));
#else
  (void)clocks, (void)taken;
  return cudaErrorNotSupported;
#endif
}

cudaError_t dense_gemm_fp8_sm90(const DenseFp8Gemm& g, TileKind tiles, int device, cudaStream_t stream) {
  switch (tiles) {
    case TileKind::kDecode: return run_dense_gemm_fp8<TileKind::kDecode>(g, device, stream);
    case TileKind::kLarge: return run_dense_gemm_fp8<TileKind::kLarge>(g, device, stream);
    case TileKind::kLargeCluster: return run_dense_gemm_fp8<TileKind::kLargeCluster>(g, device, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace staticmoe::moe
