// Host side of the grouped GEMMs: tensor maps for the weights, launch configuration, and the two launches.
#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>

#include "common/env_knob.h"
#include "moe/sm90_gemm.cuh"
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

// 3-D map {k (contiguous), rows, batch} with a {64, box_rows, 1} box in the 128-byte swizzle. A weight tile of
// kBlockN rows is loaded as two boxes of kBlockN/2 (gate and up for w13; two halves for w2), so a cluster of two
// CTAs can multicast one box each.
cudaError_t make_weight_map(CUtensorMap* map, const void* base, DType dtype, int64_t k, int64_t rows, int64_t batch,
                            uint32_t box_rows) {
  EncodeTiled encode;
  if (cudaError_t err = encode_tiled_fn(&encode); err != cudaSuccess) return err;
  const cuuint64_t dims[3] = {cuuint64_t(k), cuuint64_t(rows), cuuint64_t(batch)};
  const cuuint64_t strides[2] = {cuuint64_t(k) * 2, cuuint64_t(k * rows) * 2};
  const cuuint32_t box[3] = {kBlockK, box_rows, 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            3, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int kBlockM, int kBlockN, int kStages, int kCluster, bool kGateUp>
cudaError_t launch(const CUtensorMap& map, const GemmArgs<T>& args, int device, cudaStream_t stream) {
  auto kernel = moe_gemm_sm90_kernel<T, kBlockM, kBlockN, kStages, kCluster, kGateUp>;
  constexpr int kSmem = GemmSmem<kBlockM, kBlockN, kStages>::kBytes;
  static int grid_per_device[64] = {};
  static std::mutex mu;
  int grid;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (grid_per_device[device] == 0) {  // once per device: shared-memory limit and persistent grid size
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      if (err != cudaSuccess) return err;
      int sms = 0, per_sm = 0;
      if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
      if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, gemm_threads<kBlockM>(), kSmem)) != cudaSuccess)
        return err;
      grid_per_device[device] = sms * (per_sm > 0 ? per_sm : 1);
      if (kCluster > 1) {  // clusters live inside one GPC: fewer may fit than SMs / kCluster
        PdlLaunch probe(dim3(grid_per_device[device] / kCluster * kCluster), gemm_threads<kBlockM>(), kSmem, stream,
                        kCluster);
        int clusters = 0;
        if ((err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &probe.config)) != cudaSuccess) return err;
        grid_per_device[device] = kCluster * (clusters > 0 ? clusters : 1);
      }
    }
    grid = grid_per_device[device];
  }
  return launch_cluster_with_pdl(kernel, grid, gemm_threads<kBlockM>(), kSmem, kCluster, stream, map, args);
}

// Tile shapes by the host's rows-per-expert estimate: 128x256 tiles (48 KB a stage, 4 stages) where experts are
// large, for 1.5x the FLOPs per byte of L2 traffic of 128x128; 64x128 tiles (24 KB, 6 stages) for decode, where
// more, narrower tiles keep more SMs streaming weights.
template <int kBlockM>
constexpr int block_n() { return kBlockM == 128 ? 256 : 128; }

cudaError_t weight_maps(const Problem& p, int block_m, const void* w13, const void* w2, CUtensorMap* w13_map,
                        CUtensorMap* w2_map, int* n_tiles1, int* n_tiles2) {
  const int bn = block_m == 128 ? block_n<128>() : block_n<64>();
  *n_tiles1 = (p.intermediate + bn / 2 - 1) / (bn / 2);
  *n_tiles2 = (p.hidden + bn - 1) / bn;
  cudaError_t err = make_weight_map(w13_map, w13, p.dtype, p.hidden, p.intermediate, 2 * int64_t(p.num_experts),
                                    bn / 2);
  if (err != cudaSuccess) return err;
  return make_weight_map(w2_map, w2, p.dtype, p.intermediate, p.hidden, p.num_experts, bn / 2);
}

// Raster group size: kGroupM, or STATICMOE_RASTER_GROUP_M{1,2} (GEMM1 / GEMM2) for tuning probes.
int32_t raster_group(const char* env_name) { return int32_t(env_knob(env_name, kGroupM, 1)); }

template <typename T, bool kGateUp>
cudaError_t dispatch(const LaunchConfig& cfg, const CUtensorMap& map, const GemmArgs<T>& args, int device,
                     cudaStream_t stream) {
  if (cfg.block_m == 128 && cfg.cluster_m == 2)
    return launch<T, 128, block_n<128>(), 4, 2, kGateUp>(map, args, device, stream);
  if (cfg.block_m == 128) return launch<T, 128, block_n<128>(), 4, 1, kGateUp>(map, args, device, stream);
  return launch<T, 64, block_n<64>(), 6, 1, kGateUp>(map, args, device, stream);
}

template <typename T>
cudaError_t run_gemms(const Problem& p, const LaunchConfig& cfg, const T* x, const void* w13, const void* w2,
                      const float* topk_weights, const Workspace& ws, int device, cudaStream_t stream) {
  const Plan& plan = ws.plan;
  const TaskMap map{plan.mtile_prefix, plan.slot_expert, plan.num_slots};
  CUtensorMap w13_map, w2_map;
  int n_tiles1, n_tiles2;
  cudaError_t err = weight_maps(p, cfg.block_m, w13, w2, &w13_map, &w2_map, &n_tiles1, &n_tiles2);
  if (err != cudaSuccess) return err;
  static const int32_t group1 = raster_group("STATICMOE_RASTER_GROUP_M1");
  static const int32_t group2 = raster_group("STATICMOE_RASTER_GROUP_M2");
  GemmArgs<T> g1{x, static_cast<T*>(ws.intermediate), topk_weights, plan.expert_counts, plan.expert_offsets,
                 plan.sorted_rows, map, p.hidden, p.intermediate, n_tiles1, p.top_k, group1};
  if ((err = dispatch<T, true>(cfg, w13_map, g1, device, stream)) != cudaSuccess) return err;
  GemmArgs<T> g2{static_cast<const T*>(ws.intermediate), static_cast<T*>(ws.slot_out), topk_weights,
                 plan.expert_counts, plan.expert_offsets, plan.sorted_rows, map, p.intermediate, p.hidden, n_tiles2,
                 p.top_k, group2};
  return dispatch<T, false>(cfg, w2_map, g2, device, stream);
}

}  // namespace

cudaError_t grouped_gemms_sm90(const Problem& p, const LaunchConfig& cfg, const void* x, const void* w13,
                               const void* w2, const float* topk_weights, const Workspace& ws, int device,
                               cudaStream_t stream) {
  if (p.dtype == DType::kBF16)
    return run_gemms(p, cfg, static_cast<const __nv_bfloat16*>(x), w13, w2, topk_weights, ws, device, stream);
  return run_gemms(p, cfg, static_cast<const __half*>(x), w13, w2, topk_weights, ws, device, stream);
}

}  // namespace staticmoe::moe
