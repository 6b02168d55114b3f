"""Per-kernel times of one fused_moe call (torch.profiler), for points that miss their prediction."""

import torch
from torch.profiler import ProfilerActivity, profile

from model.kernels import fused_moe

torch.manual_seed(0)
dev = "cuda"
points = [("deepseek", (256, 8, 7168, 2048), 8192, "bal"), ("deepseek", (256, 8, 7168, 2048), 32768, "bal"),
          ("mixtral", (8, 2, 4096, 14336), 32768, "same"), ("mixtral", (8, 2, 4096, 14336), 32768, "bal")]
cache = {}
for name, (E, k, H, I), T, routing in points:
    if name not in cache:
        cache.clear()
        torch.cuda.empty_cache()
        cache[name] = (torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) / H**0.5,
                       torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5)
    w13, w2 = cache[name]
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids = (torch.arange(k, device=dev).expand(T, k).int() if routing == "same"
           else torch.rand(T, E, device=dev).topk(k, dim=1).indices.int())
    tw = torch.rand(T, k, device=dev)
    for _ in range(2):
        fused_moe(x, w13, w2, tw, ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fused_moe(x, w13, w2, tw, ids)
        torch.cuda.synchronize()
    rows = [(e.key[:70], e.device_time_total / 1e3) for e in prof.key_averages()]
    print(f"{name} T={T} {routing}: " + "; ".join(f"{kname} {ms:.3f} ms" for kname, ms in rows if ms > 0.01),
          flush=True)
    del x, ids, tw
