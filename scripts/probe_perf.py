"""Quick perf probe of fused_moe (the full benchmark is benchmarks/bench_moe.py): a few points, ms and TFLOPS,
against cuBLAS dense and a device copy measured in the same run."""

import torch
import triton.testing

from model.kernels import fused_moe

torch.manual_seed(0)
dev = "cuda"


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
dense_ms = bench(lambda: a @ a)
print(f"cuBLAS 8192^3: {2 * 8192**3 / dense_ms / 1e9:.0f} TFLOPS")
buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
dst = torch.empty_like(buf)
copy_ms = bench(lambda: dst.copy_(buf))
bw = 2 * buf.numel() / copy_ms / 1e9
print(f"copy: {bw:.0f} GB/s")
del a, buf, dst
for name, (E, k, H, I) in {"qwen3": (128, 8, 2048, 768), "mixtral": (8, 2, 4096, 14336)}.items():
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5
    for T in (1, 64, 512, 4096, 16384):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        ids = torch.rand(T, E, device=dev).topk(k, dim=1).indices.int()
        tw = torch.rand(T, k, device=dev)
        ms = bench(lambda: fused_moe(x, w13, w2, tw, ids))
        flops = 2 * T * k * H * 3 * I
        touched = min(E, T * k) * 3 * H * I * 2
        print(f"{name:8s} T={T:6d} {ms * 1e3:9.1f} us {flops / ms / 1e9:7.1f} TFLOPS  weights/time {touched / ms / 1e9 / bw * 100:5.1f}% of copy")
    del w13, w2
