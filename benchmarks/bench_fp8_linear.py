#!/usr/bin/env python
"""Dense FP8 linear (`model.kernels.fp8_linear`) against the bf16 `F.linear` (cuBLAS) at the same shape, per row
count M, each path timed on its own in the same run: our CUDA kernel (`csrc/moe/dense_fp8.cu`, the FP8 GEMM2 kernel
with one expert; where the extension is built), `fp8_linear`'s Triton path as it dispatches (`triton`), its two
kernels forced (`triton_block`: quantiser + block GEMM `triton_fp8_gemm` at any M; `triton_decode`: the split-K
decode kernel with fused quantisation `triton_fp8_gemv`, up to its 64 rows, "-" above), and block-scaled
`torch._scaled_mm` where this torch build takes the recipe. Each is timed as 48 calls captured in one CUDA graph (a
decode graph holds one call per layer) with the weights of the 48 calls distinct, so L2 holds none of them.

Byte floor per call: weight bytes (+ scales) ÷ the device copy bandwidth measured in the same run. Shapes: the dense
linears of qwen3-30b-a3b (qkv, o) and of a DeepSeek-V3-like attention, which an FP8 checkpoint runs in FP8.

    python benchmarks/bench_fp8_linear.py [--m 1 16 64 256 512 1024 4096] [--tile-sweep] [--out DIR]
"""

import argparse
import importlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_ms
from model.kernels import extension, triton_fp8_gemm, triton_fp8_gemv
from model.kernels.fp8 import quantize_fp8_blocks
from model.kernels.fp8_linear import block_scaled_mm_supported, dense_fp8_path

fl = importlib.import_module("model.kernels.fp8_linear")  # the module's per-path functions

SHAPES = {  # name: (N, K)
    "qwen3-30b-a3b qkv": (5120, 2048),
    "qwen3-30b-a3b o": (2048, 4096),
    "dsv3 q_b": (24576, 1536),
    "dsv3 o": (7168, 16384),
    "dsv3 kv_a": (576, 7168),  # N = 4.5 weight blocks: a ragged last tile
}
LAYERS = 48


def cuda_tiles(tiles: str):
    """The CUDA path with the tile kind forced (the sweep that tests the chooser's thresholds)."""
    def run(x, weight, weight_scale, bias):
        return extension.dense_fp8_linear_cuda(x, weight, weight_scale, bias, tiles=tiles)
    return run


def triton_block(x, weight, weight_scale, bias):
    """Quantiser + `triton_fp8_gemm` whatever M (fp8_linear's Triton path above DECODE_MAX_ROWS rows)."""
    xq, xs = fl._quantize_rows(x)
    return triton_fp8_gemm.fp8_block_gemm(xq, xs, weight, weight_scale, bias, x.dtype)


def triton_decode(x, weight, weight_scale, bias):
    """The decode kernel (quantisation fused, split-K) whatever its cut; None above the rows it takes."""
    if x.shape[0] > triton_fp8_gemv.KERNEL_MAX_ROWS:
        return None
    return triton_fp8_gemv.fp8_decode_linear(x, weight, weight_scale, bias, x.dtype)


def fp8_paths(dev: torch.device, tile_sweep: bool = False) -> dict:
    """The FP8 paths this device runs, each called directly (not through the STATICMOE_FP8_DENSE choice)."""
    paths = {}
    if extension.available_for(dev):
        paths["cuda"] = fl._cuda_path
        if tile_sweep:
            paths.update({f"cuda_{t}": cuda_tiles(t) for t in ("decode", "large", "cluster")})
    if triton_fp8_gemm.available():
        paths["triton"] = fl._triton_path
        paths["triton_block"] = triton_block
        paths["triton_decode"] = triton_decode
    if block_scaled_mm_supported(dev):
        paths["scaled_mm"] = fl._scaled_mm_path
    return paths


def bench_shape(n: int, k: int, ms: list[int], gbps: float, paths: dict) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w16 = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    w8 = [quantize_fp8_blocks(w.float()) for w in w16]
    floor16 = 2 * n * k / gbps / 1e6
    floor8 = (n * k + 4 * w8[0][1].numel()) / gbps / 1e6
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        it16 = iter(range(10**9))
        t16 = graph_ms(lambda: F.linear(x, w16[next(it16) % LAYERS]), replays=20, calls=LAYERS)
        row = dict(m=m, bf16_us=t16 * 1e3, bf16_floor_x=t16 / floor16, bf16_tflops=2 * m * n * k / t16 / 1e9)
        for name, fn in paths.items():
            if fn(x, *w8[0], None) is None:  # a path that does not take m rows
                continue
            it8 = iter(range(10**9))
            t8 = graph_ms(lambda: fn(x, *w8[next(it8) % LAYERS], None), replays=20, calls=LAYERS)
            row.update({f"{name}_us": t8 * 1e3, f"{name}_speedup": t16 / t8, f"{name}_floor_x": t8 / floor8,
                        f"{name}_tflops": 2 * m * n * k / t8 / 1e9})
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 512, 1024, 4096])
    p.add_argument("--out", type=Path)
    p.add_argument("--tile-sweep", action="store_true",
                   help="also time the CUDA path with each tile kind forced (decode 64x128, large 128x256, cluster)")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    paths = fp8_paths(dev, args.tile_sweep)
    if not paths:
        raise SystemExit("no fast FP8 path here: fp8_linear would time its dequantising fallback")
    # read + write bytes per second of a large copy: the rate a read-only weight stream reaches too (bench_engine)
    gbps = copy_bandwidth_gbps(Timer(dev, budget_ms=200), 1 << 30)["gbps"]
    print(f"{torch.cuda.get_device_name()}: copy {gbps:.0f} GB/s (read+write); FP8 paths timed {', '.join(paths)}; "
          f"fp8_linear takes {dense_fp8_path(dev)} here; {LAYERS} calls per graph", flush=True)
    report = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M"), copy_gbps=gbps,
                  path=dense_fp8_path(dev), paths=list(paths), shapes={})
    for name, (n, k) in SHAPES.items():
        rows = bench_shape(n, k, args.m, gbps, paths)
        report["shapes"][name] = rows
        head = " | ".join(f"{p} µs | {p} speed-up | {p} ÷ floor" for p in paths)
        print(f"\n{name}: N={n} K={k} (speed-up: bf16 time ÷ FP8 time)\n| M | bf16 µs | bf16 ÷ floor | {head} | "
              f"bf16 TFLOPS | {' | '.join(f'{p} TFLOPS' for p in paths)} |\n"
              f"|{'---|' * (4 + 4 * len(paths))}", flush=True)
        for r in rows:
            cells = " | ".join(f"{r[p + '_us']:.1f} | {r[p + '_speedup']:.2f}× | {r[p + '_floor_x']:.2f}×"
                               if p + "_us" in r else "- | - | -" for p in paths)
            tflops = " | ".join(f"{r[p + '_tflops']:.0f}" if p + "_us" in r else "-" for p in paths)
            print(f"| {r['m']} | {r['bf16_us']:.1f} | {r['bf16_floor_x']:.2f}× | {cells} | {r['bf16_tflops']:.0f} | "
                  f"{tflops} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"bench_fp8_linear_{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
