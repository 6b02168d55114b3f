#!/usr/bin/env python
"""Profiles of the MoE op at chosen points, for questions the full benchmark (bench_moe.py) does not answer: which
kernel of the layer a point spends its time in, what the plan alone costs, one call for Nsight Compute. Kernel
variants selected by environment knobs (STATICMOE_CLUSTER_MIN_ROWS, STATICMOE_RASTER_GROUP_M1/2; see README "GPU
runs") are compared by running the same points in separate processes.

    python benchmarks/profile_moe.py points mixtral:32768:balanced qwen3:8192:zipf ...   # SHAPE:T:ROUTING
    python benchmarks/profile_moe.py plan 1:8 64:256 512:64:8 ...                        # T:E[:k]
    ncu ... python benchmarks/profile_moe.py once deepseek:32768:uniform                 # one call, nothing else

SHAPE is a name (or unique prefix) of benchmarks.moe_cases.EXPERT_SHAPES or eEkKhHiI (e128k8h2048i1536: any shape),
ROUTING one of its routings.
"""

import argparse
import os
import re

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_timing import Timer, graph_ms
from benchmarks.moe_cases import EXPERT_SHAPES, make_routing, moe_flops
from model.kernels import extension, fused_moe
from model.kernels.fp8 import quantize_fp8_blocks

PLAN_GRAPH_CALLS = 16  # plans per graph, as a model's decode graph holds one per layer
PLAN_DIM = 128  # H = I for the plan probe: the plan does not depend on them beyond the workspace size


def shape_of(name: str) -> tuple[str, tuple[int, int, int, int]]:
    custom = re.fullmatch(r"e(\d+)k(\d+)h(\d+)i(\d+)", name)  # any shape, e.g. e128k8h2048i1536 (per-step fits)
    if custom:
        return name, tuple(int(g) for g in custom.groups())
    matches = [key for key in EXPERT_SHAPES if key.startswith(name)]
    if len(matches) != 1:
        raise SystemExit(f"shape {name!r} names {matches or 'nothing'}; choose from {list(EXPERT_SHAPES)}")
    return matches[0], EXPERT_SHAPES[matches[0]]


def kernel_label(name: str) -> str:
    if "moe_gemm" in name:  # kGateUp, the first bool template argument (after kCluster), is true for GEMM1
        flag = re.search(r"\b(true|false)\b|Lb([01])E", name)  # demangled or mangled; a later bool is kPosted
        return "gemm1" if flag and flag.group(0) in ("true", "Lb1E") else "gemm2"
    if "quantiz" in name:
        return "quantise"
    return "combine" if "combine" in name else "plan" if "plan" in name else name[:40]


class Weights:
    """Random expert weights of one shape at a time (the largest take most of the GPU)."""

    def __init__(self, device, fp8: bool = False):
        self.device, self.fp8, self.name, self.tensors = device, fp8, None, None

    def of(self, name: str, E: int, H: int, I: int):
        """(w13, w2) in bf16, or with --fp8 (w13, w2, w13_scale, w2_scale) quantised per 128x128 block."""
        if name != self.name:
            self.tensors = None
            torch.cuda.empty_cache()
            w13 = torch.randn(E, 2 * I, H, device=self.device, dtype=torch.bfloat16) / H**0.5
            w2 = torch.randn(E, H, I, device=self.device, dtype=torch.bfloat16) / I**0.5
            if self.fp8:  # one expert at a time: no float32 copy of the whole tensor
                q = [[quantize_fp8_blocks(w[e]) for e in range(E)] for w in (w13, w2)]
                del w13, w2
                (q13, s13), (q2, s2) = ([torch.stack(t) for t in zip(*qs)] for qs in q)
                self.tensors = (q13, q2, s13, s2)
            else:
                self.tensors = (w13, w2)
            self.name = name
        return self.tensors


def point_inputs(point: str, weights: Weights, gen: torch.Generator):
    shape, T, routing = point.split(":")
    name, (E, k, H, I) = shape_of(shape)
    T = int(T)
    w13, w2, *scales = weights.of(name, E, H, I)
    tw, ids = make_routing(routing, T, E, k, gen)
    x = torch.randn(T, H, device=gen.device, dtype=torch.bfloat16, generator=gen)
    kwargs = dict(w13_scale=scales[0], w2_scale=scales[1]) if scales else {}
    return (f"{'fp8 ' if scales else ''}{name} T={T} {routing}", (x, w13, w2, tw, ids), kwargs,
            moe_flops(T, k, H, I))


def points(args, device):
    """Median time of the whole op (L2 flushed before each call), TFLOPS, and device ms of each kernel."""
    knobs = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("STATICMOE_")) or "defaults"
    timer, weights = Timer(device, budget_ms=300.0), Weights(device, args.fp8)
    gen = torch.Generator(device=device).manual_seed(0)
    for point in args.points:
        label, inputs, kwargs, flops = point_inputs(point, weights, gen)
        ms = timer.median_ms(lambda: fused_moe(*inputs, **kwargs), warmup=2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fused_moe(*inputs, **kwargs)
            torch.cuda.synchronize()
        per_kernel: dict[str, float] = {}
        for e in prof.key_averages():
            if e.device_time_total > 0:
                per_kernel[kernel_label(e.key)] = per_kernel.get(kernel_label(e.key), 0.0) + e.device_time_total / 3e3
        print(f"[{knobs}] {label}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOPS | "
              + " ".join(f"{n} {v:.3f}" for n, v in sorted(per_kernel.items())), flush=True)


def plan(args, device):
    """The device plan alone: 20 eager launches (what ncu profiles), then µs per plan in a graph of 16 plans."""
    for point in args.points:
        T, E, *rest = (int(v) for v in point.split(":"))
        k = rest[0] if rest else 8
        gen = torch.Generator(device=device).manual_seed(T * 1000 + E)
        _, ids = make_routing("balanced", T, E, k, gen)
        ws = extension.moe_workspace(T, k, E, PLAN_DIM, PLAN_DIM, device).zero_()
        launch = lambda: extension._C.moe_plan_device(  # noqa: E731
            ids.data_ptr(), T, k, E, PLAN_DIM, PLAN_DIM, ws.data_ptr(), 0, torch.cuda.current_stream().cuda_stream)
        for _ in range(20):
            launch()
        torch.cuda.synchronize()
        us = 1e3 * graph_ms(launch, calls=PLAN_GRAPH_CALLS)
        print(f"plan T={T} E={E} k={k}: {us:.2f} us per plan (x{PLAN_GRAPH_CALLS} graph)", flush=True)


def once(args, device):
    """One call per point and nothing else, so a profiler's capture holds exactly the layer's kernels."""
    weights, gen = Weights(device, args.fp8), torch.Generator(device=device).manual_seed(0)
    for point in args.points:
        _, inputs, kwargs, _ = point_inputs(point, weights, gen)
        fused_moe(*inputs, **kwargs)
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["points", "plan", "once"])
    p.add_argument("points", nargs="+", help="SHAPE:T:ROUTING (points, once) or T:E[:k] (plan)")
    p.add_argument("--fp8", action="store_true", help="the FP8 op (weights quantised per 128x128 block)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_moe.py profiles the CUDA kernels: it needs a GPU")
    {"points": points, "plan": plan, "once": once}[args.command](args, torch.device("cuda"))


if __name__ == "__main__":
    main()
