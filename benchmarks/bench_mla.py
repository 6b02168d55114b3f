#!/usr/bin/env python
"""MLA decode attention (issue 23): the Triton paged kernel over the latent cache against its byte floor.

The kernel reads each sequence's cache rows once for all heads: B × context × (kv_lora_rank + rope) values. Its
floor is those bytes over the device-copy bandwidth measured in the same run (read + write bytes per second, the
ceiling every benchmark here uses). Target: ≤ 1.3× the floor at batch 64, context 4096 (DeepSeek-V2-Lite: 16
heads, rank 512, rope 64, bf16). Also: the kernel inside a CUDA graph (as decode runs it), the pure-torch reference
(gathers the blocks, one SDPA call) as the named baseline, and the kernel's error against a float64 reference.

    python benchmarks/bench_mla.py                              # batch 64, context 4096, 16 heads
    python benchmarks/bench_mla.py --batch 1,64 --context 1024,4096 --heads 16,128
    python benchmarks/bench_mla.py --sweep                      # also each launch alternative of the kernel
    python benchmarks/bench_mla.py --device cpu                 # smoke test of the script on tiny shapes
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_ms  # noqa: E402
from model.layers.mla_decode import mla_decode_reference  # noqa: E402
from model.layers.paged_attention import _decode_mask  # noqa: E402
from service.arg_types import positive_int  # noqa: E402

GIB = 1 << 30


def make_case(batch: int, context: int, heads: int, rank: int, rope: int, page: int, dtype, device, seed=0):
    """q [B, Hq, r + rope], a latent cache with each sequence's blocks scattered, tables [B, blocks], lens [B]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = -(-context // page)
    num_blocks = batch * blocks_per_seq + 1
    tables = (torch.randperm(num_blocks - 1, generator=g)[: batch * blocks_per_seq] + 1).view(batch, -1)
    cache = torch.randn(num_blocks, page, rank + rope, generator=g).to(device, dtype)
    q = torch.randn(batch, heads, rank + rope, generator=g).to(device, dtype)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, cache, tables.to(device), lens.to(device)


def bench_mla_decode(batch: int = 64, context: int = 4096, heads: int = 16, rank: int = 512, rope: int = 64,
                     page: int = 16, dtype=torch.bfloat16, device="cuda", timer: Timer | None = None,
                     copy_gbps: float | None = None, budget_ms: float = 300.0, config=None,
                     reference: bool = True, splits: int | None = None) -> dict:
    """One point: times (ms) of the kernel (events per call, L2 flushed; and inside a CUDA graph), the reference,
    the byte floor and the ratios."""
    device = torch.device(device)
    timer = timer or Timer(device, budget_ms)
    if copy_gbps is None:
        copy_gbps = copy_bandwidth_gbps(timer, GIB if device.type == "cuda" else 16 << 20)["gbps"]
    q, cache, tables, lens = make_case(batch, context, heads, rank, rope, page, dtype, device)
    scale = (128 + rope) ** -0.5
    mask = _decode_mask(lens, tables.shape[1] * page, None)
    torch_path = lambda: mla_decode_reference(q, cache, tables, mask, scale, rank)  # noqa: E731
    latent_bytes = batch * context * (rank + rope) * dtype.itemsize
    floor_ms = latent_bytes / (copy_gbps * 1e6)
    result = dict(batch=batch, context=context, heads=heads, rank=rank, rope=rope, page=page,
                  dtype=str(dtype).removeprefix("torch."), latent_bytes=latent_bytes, copy_gbps=copy_gbps,
                  floor_ms=floor_ms, reference_ms=timer.median_ms(torch_path) if reference else float("nan"))
    if device.type == "cuda":
        from model.layers.triton_mla_decode import config_for, paged_mla_decode

        config = config or config_for(heads)
        result["config"] = dict(vars(config))
        kernel = lambda: paged_mla_decode(q, cache, tables, lens, scale, rank, splits=splits,  # noqa: E731
                                          config=config)
        exact = mla_decode_reference(q.double(), cache.double(), tables, mask, scale, rank)
        result["max_abs_error"] = float((kernel().double() - exact).abs().max())
        result["kernel_ms"] = timer.median_ms(kernel, warmup=2)
        result["graph_ms"] = graph_ms(kernel, replays=50)
        result["ratio_to_floor"] = result["kernel_ms"] / floor_ms
        result["graph_ratio_to_floor"] = result["graph_ms"] / floor_ms
        result["speedup_over_reference"] = result["reference_ms"] / result["kernel_ms"]
    return result


def line(r: dict) -> str:
    head = (f"B={r['batch']:>3} ctx={r['context']:>5} heads={r['heads']:>3} {r['dtype']}: "
            f"latent {r['latent_bytes'] / 2**20:7.1f} MiB, floor {r['floor_ms'] * 1e3:7.1f} us "
            f"({r['copy_gbps']:.0f} GB/s copy)")
    if "kernel_ms" not in r:
        return head + f"  reference {r['reference_ms'] * 1e3:.1f} us (CPU smoke)"
    return (head + f"  kernel {r['kernel_ms'] * 1e3:7.1f} us = {r['ratio_to_floor']:.2f}x floor, "
            f"in a graph {r['graph_ms'] * 1e3:7.1f} us = {r['graph_ratio_to_floor']:.2f}x; "
            f"reference {r['reference_ms'] * 1e3:.0f} us ({r['speedup_over_reference']:.1f}x slower); "
            f"max |err| {r['max_abs_error']:.1e}")


def sweep(batch, context, heads, rank, rope, page, dtype, device, timer, copy_gbps, stages=(1, 2, 3),
          splits=(None,)) -> list[dict]:
    """The kernel at one point under each launch alternative (None in `splits`: the split count the engine would
    choose); a failing one (shared memory, registers) says why."""
    from model.layers.triton_mla_decode import MlaKernelConfig

    rows = []
    widths = [h for h in (16, 32, 64) if h == 16 or h // 2 < heads]  # wider than the heads: the same as narrower
    for block_h in widths:
        for block_n in (16, 32, 64):
            for num_warps in (4, 8):
                for num_stages in stages:
                    for split in splits:
                        config = MlaKernelConfig(block_h=block_h, block_n=block_n, num_warps=num_warps,
                                                 num_stages=num_stages)
                        name = (f"block_h={block_h:>2} block_n={block_n:>2} warps={num_warps} stages={num_stages} "
                                f"splits={split or 'chosen'}")
                        try:
                            r = bench_mla_decode(batch, context, heads, rank, rope, page, dtype, device, timer,
                                                 copy_gbps, config=config, reference=False, splits=split)
                            row = dict(config=vars(config), splits=split, kernel_ms=r["kernel_ms"],
                                       graph_ms=r["graph_ms"], ratio_to_floor=r["ratio_to_floor"],
                                       max_abs_error=r["max_abs_error"])
                            print(f"    {name}: {r['kernel_ms'] * 1e3:7.1f} us = {r['ratio_to_floor']:.2f}x floor "
                                  f"(graph {r['graph_ratio_to_floor']:.2f}x), max |err| {r['max_abs_error']:.1e}",
                                  flush=True)
                        except Exception as err:  # noqa: BLE001 - an alternative that does not build is a result
                            row = dict(config=vars(config), splits=split, error=repr(err)[:200])
                            print(f"    {name}: failed {err!r:.120}", flush=True)
                        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--batch", type=ints, default=[64])
    p.add_argument("--context", type=ints, default=[4096])
    p.add_argument("--heads", type=ints, default=[16], help="query heads per GPU (V2-Lite 16, V3 128)")
    p.add_argument("--page", type=int, default=16, help="tokens per KV block (the engine's block_size)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, reference only")
    p.add_argument("--budget-ms", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--sweep", action="store_true", help="also time the kernel's launch alternatives (tile keys, "
                   "warps, pipeline stages) at each point")
    p.add_argument("--sweep-stages", type=int, nargs="+", default=[1, 2, 3], help="the pipeline depths --sweep tries")
    p.add_argument("--sweep-splits", type=positive_int, nargs="+", default=None,
                   help="split counts --sweep tries for each launch (default: the one the engine chooses)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rank, rope = (512, 64) if device.type == "cuda" else (32, 16)
    if device.type == "cpu":
        args.batch, args.context, args.heads = [min(b, 4) for b in args.batch], [64], [4]
    timer = Timer(device, args.budget_ms)
    copy_gbps = copy_bandwidth_gbps(timer, GIB if device.type == "cuda" else 16 << 20)["gbps"]
    results = []
    for heads in args.heads:
        for batch in args.batch:
            for context in args.context:
                r = bench_mla_decode(batch, context, heads, rank, rope, args.page, dtype, device, timer, copy_gbps)
                print(line(r), flush=True)
                results.append(r)
                if args.sweep and device.type == "cuda":
                    r["sweep"] = sweep(batch, context, heads, rank, rope, args.page, dtype, device, timer, copy_gbps,
                                       args.sweep_stages, args.sweep_splits or (None,))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
