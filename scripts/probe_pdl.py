"""DeepSeek-V3 layer time and per-kernel times at a given T in a fresh process (python3 scripts/probe_pdl.py T)."""
import sys

import torch
import triton.testing

from torch.profiler import ProfilerActivity, profile
from model.kernels import fused_moe
T = int(sys.argv[1]); E, k, H, I = 256, 8, 7168, 2048
torch.manual_seed(0)
w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.int()
tw = torch.rand(T, k, device="cuda")
ms = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, tw, ids), warmup=3, rep=300, return_mode="median")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    fused_moe(x, w13, w2, tw, ids); torch.cuda.synchronize()
ks = [f"{e.device_time_total / 1e3:.2f}" for e in prof.key_averages() if "gemm" in e.key]
print(f"T={T}: layer {ms:.2f} ms ({2*T*k*H*3*I/ms/1e9:.0f} TFLOPS), gemms {ks} ms", flush=True)
