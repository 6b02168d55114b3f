#!/usr/bin/env python
"""Where a grouped-GEMM tile's cycles go, from a probe build's in-kernel clocks (csrc/common/tile_clocks.cuh): the
first math thread of CTA 0 stamps clock64() when a tile starts, once it has decoded it, when its first stage is
ready, when the mainloop's last MMA has retired and when the epilogue has issued its stores, and sums the cycles
the mainloop's later K steps waited for their stage's data. For each GEMM of the last layer call this prints the
median cycles of those phases over the tiles CTA 0 took, the mainloop's cycles per K step against the tensor cores'
rate for the tile (and how much of the mainloop was waiting for data), and the gap from one tile's epilogue to the
next tile's start.

    pip install --no-build-isolation --no-deps -e . -C build-dir=build/probe \\
        -C cmake.define.STATICMOE_EXTRA_NVCC_FLAGS=-DSTATICMOE_TILE_CLOCKS       # the probe build
    python benchmarks/profile_tile_clocks.py [--fp8] qwen3:8192:balanced mixtral:8192:balanced ...

Points are profile_moe.py's SHAPE:T:ROUTING. `gpu_check.sh tile-clocks` builds the probe beside the normal build and
puts the normal extension back afterwards.
"""

import argparse
import statistics

EVENTS = ("start", "decoded", "data ready", "mainloop done", "epilogue done", "starved")  # the last one a sum
PHASES = (("decode", 0, 1), ("wait for data", 1, 2), ("mainloop", 2, 3), ("epilogue", 3, 4))
# dense FMAs per SM per clock (H100/H200 tensor cores): 1024 per clock per SM sub-partition in 16 bits, twice in FP8
FMA_PER_CLOCK = {False: 2048, True: 4096}


def phase_cycles(stamps: list[list[int]]) -> dict[str, float]:
    """stamps: [tiles][6] of one GEMM's recorded tiles, in the order CTA 0 took them: five clock64 values (0: not
    stamped, e.g. an empty cluster half that only passes its stages through), then the mainloop's summed waits for
    data after its first K step -> the median cycles of each phase, of the whole tile (start to epilogue done), of
    the mainloop's data waits and of the gap from a tile's epilogue to the next tile's start, over the tiles that
    have both ends of the interval."""
    out: dict[str, float] = {}
    for name, a, b in PHASES + (("tile", 0, 4),):
        spans = [t[b] - t[a] for t in stamps if t[a] and t[b]]
        if spans:
            out[name] = statistics.median(spans)
    starved = [t[5] for t in stamps if len(t) > 5 and t[2] and t[3]]
    if starved:
        out["mainloop data waits"] = statistics.median(starved)
    gaps = [nxt[0] - cur[4] for cur, nxt in zip(stamps, stamps[1:]) if cur[4] and nxt[0]]
    if gaps:
        out["to next tile"] = statistics.median(gaps)
    return out


def report(name: str, stamps: list[list[int]], k_steps: int, tile_fmas: int, fp8: bool) -> str:
    """One GEMM's lines: its phases in cycles and as a share of the tile, the mainloop per K step against the
    tensor cores' cycles for one step of the tile, and the part of the mainloop spent waiting for data."""
    cycles = phase_cycles(stamps)
    if "tile" not in cycles:
        return f"{name}: no complete tile recorded"
    tile = cycles["tile"]
    parts = " | ".join(f"{k} {v:,.0f} ({v / tile:.0%})" for k, v in cycles.items()
                       if k not in ("tile", "mainloop data waits"))
    text = f"{name}: {len(stamps)} tiles, median tile {tile:,.0f} cycles | {parts}"
    if "mainloop" in cycles:
        ideal, per_step = tile_fmas / k_steps / FMA_PER_CLOCK[fp8], cycles["mainloop"] / k_steps
        text += (f"\n    mainloop {per_step:,.0f} cycles per K step ({k_steps} steps) against {ideal:,.0f} at the "
                 f"tensor cores' rate ({ideal / per_step:.0%} of it)")
        if "mainloop data waits" in cycles:
            waits = cycles["mainloop data waits"]
            text += f"; waiting for data {waits:,.0f} cycles of it ({waits / cycles['mainloop']:.0%})"
    return text


def main():
    import torch

    from benchmarks.profile_moe import Weights, point_inputs, shape_of
    from model.kernels import extension, fused_moe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp8", action="store_true", help="the FP8 op (weights quantised per 128x128 block)")
    p.add_argument("points", nargs="+", help="SHAPE:T:ROUTING")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_tile_clocks.py reads a probe build's kernels: it needs a GPU")
    device = torch.device("cuda")
    weights, gen = Weights(device, args.fp8), torch.Generator(device=device).manual_seed(0)
    for point in args.points:
        label, inputs, kwargs, _ = point_inputs(point, weights, gen)
        for _ in range(3):  # the last call's clocks are read
            fused_moe(*inputs, **kwargs)
        torch.cuda.synchronize()
        clocks, taken = extension._C.tile_clocks()
        slots = len(clocks) // 2
        _, (E, k, H, inter) = shape_of(point.split(":")[0])
        step = 128 if args.fp8 else 64  # K elements per pipeline stage
        rows = 128  # M rows of a large tile per CTA (tile_config.h); decode-sized points use 64
        print(label, flush=True)
        for g, (name, K, N) in enumerate((("GEMM1", H, 256), ("GEMM2", inter, 256))):
            n = min(taken[g], slots // len(EVENTS))
            stamps = [list(clocks[g * slots + t * len(EVENTS):g * slots + (t + 1) * len(EVENTS)]) for t in range(n)]
            print("  " + report(name, stamps, -(-K // step), rows * N * K, args.fp8), flush=True)


if __name__ == "__main__":
    main()
