"""Per-kernel times of fused_moe at chosen points (torch.profiler), for comparing kernel variants selected by
environment knobs in separate processes (STATICMOE_CLUSTER_MIN_ROWS, STATICMOE_RASTER_GROUP_M1/2).
    python scripts/probe_points.py mixtral:32768:balanced qwen3:8192:zipf ..."""

import os
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_cases import make_routing  # noqa: E402

from model.kernels import fused_moe  # noqa: E402

SHAPES = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768), "olmoe": (64, 8, 2048, 1024),
          "deepseek": (256, 8, 7168, 2048)}
dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
knobs = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("STATICMOE_")) or "defaults"


def kernel_label(name: str) -> str:
    if "moe_gemm" in name:
        return "gemm1" if "true>" in name or "Lb1E" in name else "gemm2"
    return "combine" if "combine" in name else "plan" if "plan" in name else name[:20]


weights = {}
for point in sys.argv[1:]:
    model, T, routing = point.split(":")
    T = int(T)
    E, k, H, I = SHAPES[model]
    if model not in weights:
        weights.clear()
        torch.cuda.empty_cache()
        weights[model] = (torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H**0.5,
                          torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5)
    w13, w2 = weights[model]
    tw, ids = make_routing(routing, T, E, k, gen, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    fn = lambda: fused_moe(x, w13, w2, tw, ids)  # noqa: E731
    ms = triton.testing.do_bench(fn, warmup=5, rep=150, return_mode="median")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            lab = kernel_label(e.key)
            per[lab] = per.get(lab, 0.0) + e.device_time_total / 3e3
    tflops = (2 * T * k * H * 2 * I + 2 * T * k * I * H) / ms / 1e9
    print(f"[{knobs}] {model} T={T} {routing}: {ms:.3f} ms {tflops:.0f} TFLOPS | "
          + " ".join(f"{n} {v:.3f}" for n, v in sorted(per.items())), flush=True)
    del x, tw, ids
