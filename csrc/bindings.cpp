// Python bindings of the torch-free kernels: device pointers travel as integers, streams as cudaStream_t handles
// (torch.cuda.current_stream().cuda_stream). Host twins of the device logic are exposed for CPU unit tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "moe/combine.h"
#include "moe/dense_fp8.h"
#include "moe/moe.h"
#include "moe/plan_host.h"
#include "moe/quantize.h"
#include "moe/sm90_gemm.h"
#include "static_batch/static_batch.h"
#include "static_batch/task_map.h"

namespace py = pybind11;
using namespace staticmoe;

namespace {

template <typename P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

moe::Problem problem(int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, int dtype, bool fp8 = false) {
  if (T < 0 || k < 1 || E < 1 || E > moe::kMaxExperts || H < 8 || I < 8 || H % 8 || I % 8 || (dtype != 0 && dtype != 1))
    throw std::invalid_argument("invalid MoE problem: need T>=0, k>=1, 1<=E<=" + std::to_string(moe::kMaxExperts) +
                                ", H and I multiples of 8");
  if (fp8 && (dtype != 0 || H % moe::kFP8Block || I % moe::kFP8Block))
    throw std::invalid_argument("invalid FP8 MoE problem: need bf16 activations, H and I multiples of 128");
  return moe::Problem{T, k, E, H, I, static_cast<moe::DType>(dtype), fp8};
}

moe::Activation activation_of(int code) {
  if (code != int(moe::Activation::kSiLU) && code != int(moe::Activation::kSwigluOai))
    throw std::invalid_argument("activation code must be 0 (silu) or 1 (swiglu_oai)");
  return static_cast<moe::Activation>(code);
}

py::dict plan_layout(const moe::Problem& p) {
  // Byte offsets of the plan's arrays inside the workspace, so tests can read the device plan.
  const moe::Workspace ws = moe::carve_workspace(p, nullptr);
  auto off = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
  py::dict d;
  d["expert_counts"] = off(ws.plan.expert_counts);
  d["expert_offsets"] = off(ws.plan.expert_offsets);
  d["expert_order"] = off(ws.plan.expert_order);
  d["mtile_prefix"] = off(ws.plan.mtile_prefix);
  d["slot_expert"] = off(ws.plan.slot_expert);
  d["num_slots"] = off(ws.plan.num_slots);
  d["sorted_rows"] = off(ws.plan.sorted_rows);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "staticmoe CUDA kernels (sm_90a): static-batching task map, MoE plan, grouped GEMMs, combine";

  // ---- static_batch: the generic framework ----------------------------------------------------------------
  m.def("task_map_decode_host",
        [](const std::vector<int32_t>& prefix, const std::vector<int32_t>& slot_task, int32_t v) {
          const TileCoord c = task_map_decode_host(prefix.data(), slot_task.data(), int32_t(prefix.size()), v);
          return py::make_tuple(c.slot, c.task, c.tile);
        },
        "Host twin of the warp ballot/popc decoder: (slot, task, tile) of virtual tile v, (-1,-1,-1) past the end");
  m.def("task_map_build_device",
        [](uintptr_t counts, int32_t n, uintptr_t prefix, uintptr_t slot_task, uintptr_t num_slots, uintptr_t s) {
          check(build_task_map(ptr<const int32_t>(counts), n, ptr<int32_t>(prefix), ptr<int32_t>(slot_task),
                               ptr<int32_t>(num_slots), stream_of(s)),
                "build_task_map");
        });
  m.def("task_map_decode_all_device",
        [](uintptr_t prefix, uintptr_t slot_task, uintptr_t num_slots, int32_t num_tiles, uintptr_t out,
           uintptr_t s) {
          check(decode_all_tiles(ptr<const int32_t>(prefix), ptr<const int32_t>(slot_task),
                                 ptr<const int32_t>(num_slots), num_tiles, ptr<int32_t>(out), stream_of(s)),
                "decode_all_tiles");
        });
  m.def("varlen_gemm_workspace_bytes", &varlen_gemm_workspace_bytes);
  m.def("varlen_gemm_bf16", [](uintptr_t tasks, int32_t n, uintptr_t workspace, int device, uintptr_t s) {
    check(varlen_gemm_bf16(ptr<const VarlenGemmTask>(tasks), n, ptr<void>(workspace), device, stream_of(s)),
          "varlen_gemm_bf16");
  });

  // ---- moe -------------------------------------------------------------------------------------------------
  m.attr("MAX_EXPERTS") = moe::kMaxExperts;
  m.def("moe_workspace_bytes",
        [](int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, bool fp8) {
          return moe::workspace_bytes(problem(T, k, E, H, I, 0, fp8));
        },
        py::arg("T"), py::arg("k"), py::arg("E"), py::arg("H"), py::arg("I"), py::arg("fp8") = false);
  m.def("moe_launch_config",
        [](int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, bool fp8) {
          const moe::LaunchConfig c = moe::choose_config(problem(T, k, E, H, I, 0, fp8));
          return py::make_tuple(c.tile_rows(), c.num_chunks);  // rows per task-map tile, plan chunks
        },
        py::arg("T"), py::arg("k"), py::arg("E"), py::arg("H"), py::arg("I"), py::arg("fp8") = false);
  m.def("moe_plan_layout", [](int32_t T, int32_t k, int32_t E, int32_t H, int32_t I) {
    return plan_layout(problem(T, k, E, H, I, 0));
  });
  m.def("moe_plan_device",
        [](uintptr_t topk_ids, int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, uintptr_t workspace,
           uintptr_t expert_load, uintptr_t s) {
          const moe::Problem p = problem(T, k, E, H, I, 0);
          const moe::Workspace ws = moe::carve_workspace(p, ptr<void>(workspace));
          check(moe::build_plan(p, moe::choose_config(p), ptr<const int32_t>(topk_ids), ws.plan,
                                ptr<int64_t>(expert_load), stream_of(s)),
                "moe build_plan");
        });
  m.def("moe_combine_device",  // the combine kernel alone, on a workspace's slot outputs (for its fixed cost)
        [](uintptr_t topk_ids, int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, uintptr_t workspace,
           uintptr_t out, int dtype, uintptr_t s) {
          const moe::Problem p = problem(T, k, E, H, I, dtype);
          const moe::Workspace ws = moe::carve_workspace(p, ptr<void>(workspace));
          check(moe::combine(p, ws.slot_out, ptr<const int32_t>(topk_ids), ptr<void>(out), stream_of(s)),
                "moe combine");
        });
  m.def("moe_plan_host", [](const std::vector<int32_t>& topk_ids, int32_t E, int32_t block_m) {
    const moe::HostPlan p = moe::plan_host(topk_ids, E, block_m);
    py::dict d;
    d["expert_counts"] = p.expert_counts;
    d["expert_offsets"] = p.expert_offsets;
    d["expert_order"] = p.expert_order;
    d["mtile_prefix"] = p.mtile_prefix;
    d["slot_expert"] = p.slot_expert;
    d["num_slots"] = p.num_slots;
    d["sorted_rows"] = p.sorted_rows;
    return d;
  });
  m.def("moe_forward",
        [](uintptr_t x, uintptr_t w13, uintptr_t w2, uintptr_t topk_weights, uintptr_t topk_ids, uintptr_t out,
           uintptr_t workspace, size_t workspace_size, uintptr_t expert_load, uintptr_t w13_bias, uintptr_t w2_bias,
           int activation, int32_t T, int32_t k, int32_t E, int32_t H, int32_t I, int dtype, int device, uintptr_t s) {
          moe::Problem p = problem(T, k, E, H, I, dtype);
          p.activation = activation_of(activation);
          check(moe::forward(p, ptr<const void>(x), ptr<const void>(w13),
                             ptr<const void>(w2), ptr<const float>(topk_weights), ptr<const int32_t>(topk_ids),
                             ptr<void>(out), ptr<void>(workspace), workspace_size, ptr<int64_t>(expert_load),
                             moe::ExpertBiases{ptr<const void>(w13_bias), ptr<const void>(w2_bias)}, device,
                             stream_of(s)),
                "staticmoe moe_forward");
        });
  m.def("moe_forward_fp8",
        [](uintptr_t x, uintptr_t w13, uintptr_t w13_scale, uintptr_t w2, uintptr_t w2_scale, uintptr_t topk_weights,
           uintptr_t topk_ids, uintptr_t out, uintptr_t workspace, size_t workspace_size, uintptr_t expert_load,
           uintptr_t w13_bias, uintptr_t w2_bias, int activation, int32_t T, int32_t k, int32_t E, int32_t H,
           int32_t I, int device, uintptr_t s) {
          moe::Problem p = problem(T, k, E, H, I, 0, true);
          p.activation = activation_of(activation);
          check(moe::forward_fp8(p, ptr<const void>(x), ptr<const void>(w13),
                                 ptr<const void>(w2), moe::WeightScales{ptr<const float>(w13_scale), ptr<const float>(w2_scale)},
                                 ptr<const float>(topk_weights), ptr<const int32_t>(topk_ids), ptr<void>(out),
                                 ptr<void>(workspace), workspace_size, ptr<int64_t>(expert_load),
                                 moe::ExpertBiases{ptr<const void>(w13_bias), ptr<const void>(w2_bias)}, device,
                                 stream_of(s)),
                "staticmoe moe_forward_fp8");
        });
  m.def("dense_fp8_workspace_bytes", [](int32_t rows, int32_t k) {
    if (rows < 0 || k <= 0 || k % moe::kFP8Block) throw std::invalid_argument("need rows >= 0 and K a multiple of 128");
    return moe::dense_fp8_workspace_bytes(rows, k);
  });
  m.def("dense_fp8_linear",  // out [M, N] bf16 = quantise(x [M, K] bf16) · dequantise(w [N, K] e4m3, w_scale)ᵀ (+ bias)
        [](uintptr_t x, uintptr_t w, uintptr_t w_scale, uintptr_t bias, uintptr_t out, int32_t M, int32_t K, int32_t N,
           uintptr_t workspace, size_t workspace_size, int device, uintptr_t s, int tiles) {
          if (tiles < -1 || tiles > 2) throw std::invalid_argument("tiles must be -1 (choose), 0, 1 or 2 (a TileKind)");
          if (M < 0 || K <= 0 || K % moe::kFP8Block || N <= 0 || N % 8)
            throw std::invalid_argument("dense FP8 linear: need M >= 0, K a multiple of 128 and N a multiple of 8, got M=" +
                                        std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
          if (workspace_size < moe::dense_fp8_workspace_bytes(M, K))
            throw std::invalid_argument("dense FP8 linear: workspace smaller than dense_fp8_workspace_bytes(M, K)");
          check(moe::dense_fp8_linear(ptr<const void>(x), ptr<const void>(w), ptr<const float>(w_scale),
                                      ptr<const void>(bias), ptr<void>(out), M, K, N, ptr<void>(workspace),
                                      workspace_size, device, stream_of(s), tiles),
                "staticmoe dense_fp8_linear");
        },
        py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("K"),
        py::arg("N"), py::arg("workspace"), py::arg("workspace_size"), py::arg("device"), py::arg("stream"),
        py::arg("tiles") = -1);
  m.def("quantize_rows_fp8",  // x [rows, cols] bf16 -> e4m3 [rows, cols] + float32 scales [rows, cols/128]
        [](uintptr_t x, int32_t rows, int32_t cols, uintptr_t q, uintptr_t scale, uintptr_t s) {
          if (rows < 0 || cols % moe::kFP8Block) throw std::invalid_argument("cols must be a multiple of 128");
          check(moe::quantize_rows_fp8(ptr<const __nv_bfloat16>(x), rows, cols, ptr<uint8_t>(q), ptr<float>(scale),
                                       stream_of(s)),
                "quantize_rows_fp8");
        });
  m.def("tile_clocks",  // a probe build's per-tile clock64 stamps (common/tile_clocks.cuh): (clocks, taken)
        [] {
          std::vector<unsigned long long> clocks(2 * size_t(moe::tile_clock_slots()));
          std::vector<int> taken(2);
          const cudaError_t err = moe::read_tile_clocks(clocks.data(), taken.data());
          if (err == cudaErrorNotSupported)
            throw std::runtime_error("tile_clocks: not a probe build (build with -DSTATICMOE_TILE_CLOCKS)");
          check(err, "tile_clocks");
          return py::make_tuple(clocks, taken);
        });
}
