"""Raster-group sweep probe (run once per STATICMOE_GROUP_M value): compute-bound points of the MoE layer, TFLOPS
of the full op, plus cuBLAS 8192³ measured in the same process."""

import os

import torch
import triton.testing

from model.kernels import fused_moe

torch.manual_seed(0)
dev = "cuda"


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
dense = 2 * 8192**3 / bench(lambda: a @ a) / 1e9
del a
out = [f"group_m={os.environ.get('STATICMOE_GROUP_M', 'default')} cuBLAS {dense:.0f}"]
shapes = {"mixtral": (8, 2, 4096, 14336), "qwen3": (128, 8, 2048, 768), "deepseek": (256, 8, 7168, 2048)}
points = [("mixtral", 4096, "bal"), ("mixtral", 32768, "bal"), ("qwen3", 8192, "bal"), ("qwen3", 32768, "bal"),
          ("deepseek", 4096, "best"), ("deepseek", 16384, "bal")]
for name in shapes:
    E, k, H, I = shapes[name]
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5
    for pname, T, routing in points:
        if pname != name:
            continue
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        active = E if routing == "bal" else 2 * k  # best: tokens concentrated on a few experts
        ids = torch.rand(T, active, device=dev).topk(k, dim=1).indices.int()
        tw = torch.rand(T, k, device=dev)
        ms = bench(lambda: fused_moe(x, w13, w2, tw, ids))
        tf = 2 * T * k * H * 3 * I / ms / 1e9
        out.append(f"{name} T={T} {routing}: {ms:.3f} ms {tf:.0f} TFLOPS ({100 * tf / dense:.0f}% cuBLAS)")
    del w13, w2
    torch.cuda.empty_cache()
print(" | ".join(out), flush=True)
