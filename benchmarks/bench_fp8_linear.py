#!/usr/bin/env python
"""Dense FP8 linear (`model.kernels.fp8_linear`: the row quantiser + block-scaled `torch._scaled_mm`, or our Triton
kernel where cuBLAS refuses the recipe) against the
bf16 `F.linear` at the same shape, per row count M, each timed as 48 calls captured in one CUDA graph (a decode
graph holds one call per layer) with the weights of the 48 calls distinct, so L2 holds none of them.

Byte floor per call: weight bytes (+ scales) ÷ the device copy bandwidth measured in the same run. Shapes: the dense
linears of qwen3-30b-a3b (qkv, o) and of a DeepSeek-V3-like attention, which an FP8 checkpoint runs in FP8.

    python benchmarks/bench_fp8_linear.py [--m 1 16 64 256 1024 4096] [--out DIR]
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_ms
from model.kernels.fp8 import quantize_fp8_blocks
from model.kernels.fp8_linear import dense_fp8_path, fp8_linear

SHAPES = {  # name: (N, K)
    "qwen3-30b-a3b qkv": (5120, 2048),
    "qwen3-30b-a3b o": (2048, 4096),
    "dsv3 q_b": (24576, 1536),
    "dsv3 o": (7168, 16384),
}
LAYERS = 48


def bench_shape(n: int, k: int, ms: list[int], gbps: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w16 = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    w8 = [quantize_fp8_blocks(w.float()) for w in w16]
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        it16, it8 = iter(range(10**9)), iter(range(10**9))
        t16 = graph_ms(lambda: F.linear(x, w16[next(it16) % LAYERS]), replays=20, calls=LAYERS)
        t8 = graph_ms(lambda: fp8_linear(x, *w8[next(it8) % LAYERS], check=False), replays=20, calls=LAYERS)
        floor16 = 2 * n * k / gbps / 1e6
        floor8 = (n * k + 4 * w8[0][1].numel()) / gbps / 1e6
        rows.append(dict(m=m, bf16_us=t16 * 1e3, fp8_us=t8 * 1e3, fp8_speedup=t16 / t8,
                         bf16_floor_x=t16 / floor16, fp8_floor_x=t8 / floor8,
                         bf16_tflops=2 * m * n * k / t16 / 1e9, fp8_tflops=2 * m * n * k / t8 / 1e9))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    path = dense_fp8_path(dev)
    if path == "reference":
        raise SystemExit("no fast FP8 path here: fp8_linear would time its dequantising fallback")
    # read + write bytes per second of a large copy: the rate a read-only weight stream reaches too (bench_engine)
    gbps = copy_bandwidth_gbps(Timer(dev, budget_ms=200), 1 << 30)["gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {gbps:.0f} GB/s (read+write); FP8 path {path}; {LAYERS} calls per "
          f"graph", flush=True)
    report = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M"), copy_gbps=gbps,
                  path=path, shapes={})
    for name, (n, k) in SHAPES.items():
        rows = bench_shape(n, k, args.m, gbps)
        report["shapes"][name] = rows
        print(f"\n{name}: N={n} K={k}\n| M | bf16 µs | FP8 µs | FP8 speed-up | bf16 ÷ floor | FP8 ÷ floor | "
              f"bf16 TFLOPS | FP8 TFLOPS |\n|---|---|---|---|---|---|---|---|", flush=True)
        for r in rows:
            print(f"| {r['m']} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | {r['fp8_speedup']:.2f}× | "
                  f"{r['bf16_floor_x']:.2f}× | {r['fp8_floor_x']:.2f}× | {r['bf16_tflops']:.0f} | {r['fp8_tflops']:.0f} |",
                  flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bench_fp8_linear_{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
