#!/usr/bin/env python
"""The 16-bit decode linear (model/kernels/triton_gemv.py) against cuBLAS (`F.linear`) at the dense linears of a
decode step, beside the byte floor of the weight at the copy bandwidth measured in the same run.

    python benchmarks/bench_gemv.py [--rows 1,2,4,8,16] [--shapes "qwen3 o,olmoe qkv"]

Both run from one CUDA graph that holds the linear once per layer over distinct weights (at least 4× the L2 in all,
as a model's decode graph streams each layer's own weight), so no call finds its weight in L2; the time is per call.
"""

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_ms
from model.kernels.triton_gemv import decode_linear

# name: (N, K) of the weight [N, K]
SHAPES = {
    "qwen3 qkv": (5120, 2048), "qwen3 o": (2048, 4096),  # Qwen3-30B-A3B: 32 q + 2 x 4 kv heads of 128
    "olmoe qkv": (6144, 2048), "olmoe o": (2048, 2048),
    "gpt-oss qkv": (5120, 2880), "gpt-oss o": (2880, 4096),  # 64 q + 2 x 8 kv heads of 64, H = 2880
    "dsv2-lite q": (3072, 2048), "dsv2-lite kv_a": (576, 2048), "dsv2-lite o": (2048, 2048),
    "qwen3 lm_head": (151936, 2048),
    # K = 4096 with long N: the default takes these by its K rule, not yet timed (NOTES "Session 20")
    "mixtral qkv": (6144, 4096), "glm-4.5-air qkv": (14336, 4096), "gpt-oss lm_head": (201088, 2880),
}
L2_BYTES = 50 << 20  # the H100's; the H200's is the same size


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,2,4,8,16")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    gbps = copy_bandwidth_gbps(Timer(device, 200.0, 3, 50), 1 << 30)["gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {gbps:.0f} GB/s", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        nbytes = N * K * 2
        layers = max(2, min(64, -(-4 * L2_BYTES // nbytes)))
        weights = [(torch.randn(N, K, device=device, generator=gen) / K**0.5).bfloat16() for _ in range(layers)]
        floor_us = nbytes / (gbps * 1e3)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, K, device=device, generator=gen).bfloat16()
            times = {}
            for label, op in (("cuBLAS", F.linear), ("ours", decode_linear)):
                cycle = itertools.cycle(weights)
                times[label] = 1e3 * graph_ms(lambda: op(x, next(cycle)), replays=20, calls=layers)
            want = F.linear(x, weights[0]).float()
            diff = ((decode_linear(x, weights[0]).float() - want).abs().max() / want.abs().max()).item()
            print(f"{name:>15} M={m:<2} floor {floor_us:7.1f} us | cuBLAS {times['cuBLAS']:7.1f} us "
                  f"({times['cuBLAS'] / floor_us:.2f}x) | ours {times['ours']:7.1f} us ({times['ours'] / floor_us:.2f}x)"
                  f" | ours/cuBLAS {times['ours'] / times['cuBLAS']:.2f} | rel diff {diff:.1e}", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
