#!/usr/bin/env python
"""The two-launch decode MoE (model/kernels/triton_decode_moe*.py) against our CUDA layer at decode sizes, both
replayed from CUDA graphs (one layer per graph, as bench_moe_fp8's decode column), beside the byte floor of the
experts' weights (and FP8 scales) the step touches at the copy bandwidth measured in the same run. The graphs of one
point route to different experts in turn (moe_cases.expert_rotations: at least 4x the L2 of distinct weights per
cycle, as a model's layers each read their own), so a small step's weights (Qwen3 FP8 at T=1: 37.7 MB) are not
found in L2 by the next replay.

    python benchmarks/bench_decode_moe.py [--tokens 1,4,8] [--shapes qwen3-30b-a3b,...] [--sweep]

Without the CUDA extension built the CUDA column is left empty (the Triton path needs only Triton). In 16 bits the
one-launch kernel (`STATICMOE_DECODE_MOE_ONE_LAUNCH`) is timed too, at the default and the half loop step, and in
both precisions the two launches as programmatic dependent launches (`STATICMOE_PDL`, the same kernels' bits).
`--sweep` times the two-launch path at every (BLOCK_I, BLOCK_H, warps) of SWEEP_* beside the default launch
shapes and prints the fastest: the data the defaults were chosen from (benchmarks/NOTES.md "Session 20").
"""

import argparse
import contextlib

import torch

from benchmarks.bench_moe_fp8 import fp8_weight_bytes
from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, graph_cycle_ms
from benchmarks.moe_cases import EXPERT_SHAPES, FP8_EXPERT_SHAPES, expert_rotations, experts_hit, make_routing
from model.kernels import extension, pdl
from model.kernels.activation import Activation
from model.kernels.fp8 import quantize_fp8_blocks
from model.kernels.triton_decode_moe import DOWN_TILE, UP_TILE, decode_moe
from model.kernels.triton_decode_moe_fp8 import decode_moe_fp8

SHAPES = {**EXPERT_SHAPES, **FP8_EXPERT_SHAPES}
SWEEP_BLOCK_I = (4, 8, 16, 32)
SWEEP_BLOCK_H = (2, 4, 8, 16, 32)
SWEEP_WARPS = (4, 8)
# 16-bit only (the FP8 kernels step by 128-wide scale blocks): elements per loop step of (`_up`, `_down`). Offline
# sm_90a compiles of Qwen3's `_down` at BLOCK_H 4, 8 warps: 137 registers at 16384 (one program per SM), 64 at 8192.
SWEEP_TILES = ((8192, 16384), (4096, 8192))
L2_BYTES = 50 << 20  # the H100's; the H200's is the same size


def sweep(run, default_us: float, tiles=(None,)) -> str:
    """run(blocks, warps, tiles) -> µs for every launch shape; the fastest three against the default's time."""
    times = []
    for tile in tiles:
        for block_i in SWEEP_BLOCK_I:
            for block_h in SWEEP_BLOCK_H:
                for warps in SWEEP_WARPS:
                    shape = (block_i, block_h, warps) + ((tile,) if tile else ())
                    try:
                        times.append((run((block_i, block_h), warps, tile), shape))
                    except Exception as exc:  # a shape Triton cannot compile (resources): reported, not fatal
                        print(f"    {shape}: {type(exc).__name__}", flush=True)
    times.sort()
    best = ", ".join(f"{shape} {us:.1f} us" for us, shape in times[:3])
    return (f"    sweep (BLOCK_I, BLOCK_H, warps[, tiles]): default {default_us:.1f} us; fastest {best} "
            f"({default_us / times[0][0]:.2f}x)")


@contextlib.contextmanager
def pdl_on():
    """`STATICMOE_PDL=1` for the calls inside (model/kernels/pdl.py reads its switch through `enabled`)."""
    saved = pdl.enabled
    pdl.enabled = lambda: True
    try:
        yield
    finally:
        pdl.enabled = saved


def weight_bytes(hit: int, H: int, I: int, fp8: bool) -> int:
    """Bytes of the hit experts' w13 and w2 (with their float32 128x128 scales in FP8)."""
    return fp8_weight_bytes(hit, H, I) if fp8 else hit * 3 * H * I * 2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="qwen3-30b-a3b,olmoe-1b-7b,qwen3-235b-a22b,deepseek-v3,mixtral-8x7b")
    p.add_argument("--tokens", default="1,4,8")
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--sweep", action="store_true", help="time every launch shape of SWEEP_* too")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    gbps = copy_bandwidth_gbps(Timer(device, 200.0, 3, 50), 1 << 30)["gbps"]
    cuda_ok = extension.available_for(device)
    print(f"{torch.cuda.get_device_name()}: copy {gbps:.0f} GB/s; CUDA extension {'on' if cuda_ok else 'not built'}")
    gen = torch.Generator(device=device).manual_seed(0)
    for name in args.shapes.split(","):
        E, k, H, I = SHAPES[name]
        w13 = torch.randn(E, 2 * I, H, device=device, dtype=torch.bfloat16) / H ** 0.5
        w2 = torch.randn(E, H, I, device=device, dtype=torch.bfloat16) / I ** 0.5
        for precision in args.precisions.split(","):
            fp8 = precision == "fp8"
            if fp8 and (H % 128 or I % 128):
                continue
            if fp8:
                (a, sa), (b, sb) = quantize_fp8_blocks(w13), quantize_fp8_blocks(w2)
            for T in (int(t) for t in args.tokens.split(",")):
                if T * k > 64:
                    continue
                wts, ids = make_routing("balanced", T, E, k, gen)
                x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=gen)
                rotations = expert_rotations(ids, E, weight_bytes(1, H, I, fp8), 4 * L2_BYTES)
                if fp8:
                    def triton_fn(blocks=None, warps=8, tiles=None, ids=ids):
                        return decode_moe_fp8(x, a, sa, b, sb, wts, ids, None, Activation.SILU, blocks=blocks,
                                              num_warps=warps)
                    def cuda_fn(ids=ids):
                        return extension.fused_moe_fp8_cuda(x, a, sa, b, sb, wts, ids, None)
                else:
                    def triton_fn(blocks=None, warps=8, tiles=None, one_launch=False, ids=ids):
                        return decode_moe(x, w13, w2, wts, ids, None, Activation.SILU, blocks=blocks,
                                          num_warps=warps, tiles=tiles or (UP_TILE, DOWN_TILE),
                                          one_launch=one_launch)
                    cuda_fn = lambda ids=ids: extension.fused_moe_cuda(x, w13, w2, wts, ids, None)  # noqa: E731

                def graph_ms(fn):  # fn(ids=...) over the rotations: each replay reads other experts than the last
                    return graph_cycle_ms([lambda r=r: fn(ids=r) for r in rotations])
                floor_us = weight_bytes(experts_hit(ids, E), H, I, fp8) / (gbps * 1e3)
                ours_us = 1e3 * graph_ms(triton_fn)
                line = (f"{name:>16} {precision} T={T:<3} floor {floor_us:7.1f} us | two-launch {ours_us:7.1f} us "
                        f"({ours_us / floor_us:.2f}x)")
                want = triton_fn()
                with pdl_on():  # both launches as programmatic dependent launches (STATICMOE_PDL): same kernels
                    pdl_us = 1e3 * graph_ms(triton_fn)
                    same = torch.equal(triton_fn(), want)
                line += f" | PDL {pdl_us:7.1f} us ({pdl_us / floor_us:.2f}x){'' if same else ' DIFFERENT RESULT'}"
                if not fp8:  # the one-launch kernel (STATICMOE_DECODE_MOE_ONE_LAUNCH), at both loop steps
                    one_us = [1e3 * graph_ms(lambda ids, tiles=tiles: triton_fn(tiles=tiles, one_launch=True, ids=ids))
                              for tiles in SWEEP_TILES]
                    line += " | one launch " + " / ".join(f"{us:7.1f} us ({us / floor_us:.2f}x)" for us in one_us)
                if cuda_ok:
                    cuda_us = 1e3 * graph_ms(cuda_fn)
                    diff = (triton_fn().float() - cuda_fn().float()).abs().max().item()
                    line += f" | CUDA {cuda_us:7.1f} us ({cuda_us / floor_us:.2f}x) | max |diff| {diff:.2e}"
                print(line, flush=True)
                if args.sweep:
                    want = triton_fn().float()

                    def run(blocks, warps, tiles):
                        got = triton_fn(blocks, warps, tiles).float()  # a launch shape must not change the sums'
                        if (got - want).abs().max() > 1e-2 * want.abs().max():  # result beyond their rounding
                            raise ValueError("a different result")
                        return 1e3 * graph_ms(lambda ids: triton_fn(blocks, warps, tiles, ids=ids))
                    print(sweep(run, ours_us, (None,) if fp8 else SWEEP_TILES), flush=True)
        torch.cuda.empty_cache()  # the next shape's weights replace these at the loop's top


if __name__ == "__main__":
    main()
