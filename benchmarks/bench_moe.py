#!/usr/bin/env python
"""MoE layer benchmark (issue 2 item 8, issue 3 targets): our `fused_moe` against the `torch._grouped_mm` pipeline
and a per-expert loop, with a dense GEMM and a device copy as ceilings measured in the same run.

Grid: Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B, DeepSeek-V3 expert shapes × T ∈ {1 … 32768} × routings
balanced / zipf / same (points that do not fit in --mem-gb are skipped). Also: the fixed cost at T ≤ 64 inside a
CUDA graph, and the paper's three scenarios (balanced, best, worst) as % of the 989 TFLOPS datasheet peak. Every
point checks our output against the grouped_mm pipeline's (relative error; > 2e-2 is flagged).

    python benchmarks/bench_moe.py                  # full grid on an H100 (~6 min)
    python benchmarks/bench_moe.py --quick          # ~90 s
    python benchmarks/bench_moe.py --device cpu --quick   # smoke test of the script's logic on tiny shapes
    python benchmarks/bench_moe.py --fp8 [--quick ...]    # the FP8 grid: benchmarks/bench_moe_fp8.py, its flags
Results: benchmarks/results/bench_moe_<date>_<device>.{json,md}.
"""

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch

from benchmarks.bench_report import run_metadata, write_results
from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, dense_gemm_tflops, graph_ms
from benchmarks.moe_baselines import grouped_mm_moe, per_expert_loop_moe
from benchmarks.moe_cases import (EXPERT_SHAPES, experts_hit, make_routing, moe_bytes_touched, moe_flops,
                                  relative_error)
from model.kernels import extension, fused_moe, uses_cuda_kernel

REPO = Path(__file__).resolve().parents[1]
GRID_ROUTINGS = ("balanced", "zipf", "same")
SMOKE_SHAPES = {"tiny-8x2": (8, 2, 64, 32), "tiny-32x4": (32, 4, 32, 16)}  # CPU smoke mode
TOKENS = (1, 16, 128, 512, 2048, 8192, 32768)
QUICK_TOKENS = (1, 128, 4096)
SMOKE_TOKENS, SMOKE_QUICK_TOKENS = (1, 16, 64), (1, 16)
FIXED_COST_TOKENS = (1, 2, 4, 8, 16, 32, 64)
TINY_DIM = 128  # H = I of the fixed-cost proxy: the op with negligible GEMMs (plan + launches + combine)
LAYERS_IN_GRAPH = 16  # ops per graph for the in-model fixed cost (OLMoE has 16 MoE layers, Qwen3-30B-A3B 48)
DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16
REL_ERR_FLAG = 2e-2
GIB = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help=f"comma list of {', '.join(EXPERT_SHAPES)} (or 'all')")
    p.add_argument("--tokens", default=None, help="comma list of T (default: 1,16,128,512,2048,8192,32768)")
    p.add_argument("--routing", default="all", choices=[*GRID_ROUTINGS, "all"])
    p.add_argument("--quick", action="store_true", help="fewer points and iterations (~90 s on an H100)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, reference path")
    p.add_argument("--mem-gb", type=float, default=70.0, help="skip points needing more device memory")
    p.add_argument("--budget-ms", type=float, default=None, help="measured time per method per point")
    p.add_argument("--time-limit-s", type=float, default=None, help="skip the rest of the grid after this")
    p.add_argument("--scenario-tokens", type=int, default=None, help="T of the paper's scenarios")
    p.add_argument("--no-loop", action="store_true", help="skip the per-expert loop")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    smoke = args.device == "cpu"
    table = SMOKE_SHAPES if smoke else EXPERT_SHAPES
    names = list(table) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
    if smoke:
        names = list(SMOKE_SHAPES)  # real shapes would take hours on a CPU
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(table)}")
    args.shape_table = {n: table[n] for n in names}
    if args.tokens:
        args.token_list = tuple(int(t) for t in args.tokens.split(","))
    elif smoke:
        args.token_list = SMOKE_QUICK_TOKENS if args.quick else SMOKE_TOKENS
    else:
        args.token_list = QUICK_TOKENS if args.quick else TOKENS
    args.routings = GRID_ROUTINGS if args.routing == "all" else (args.routing,)
    if args.quick and args.routing == "all":
        args.routings = ("balanced", "zipf")
    args.budget_ms = args.budget_ms or (2.0 if smoke else 40.0 if args.quick else 100.0)
    args.iter_range = (1, 3) if smoke else (2, 50) if args.quick else (3, 100)
    args.time_limit_s = args.time_limit_s or (80.0 if args.quick else 300.0)
    args.scenario_tokens = args.scenario_tokens or (64 if smoke else 4096 if args.quick else 8192)
    args.fixed_tokens = (1, 16) if smoke else (1, 64) if args.quick else FIXED_COST_TOKENS
    return args


def point_bytes(T, k, H, I, elem):
    """Device memory a point needs beside the weights: ours (x, out, workspace) and the grouped_mm pipeline
    (permuted x, gate_up, activation, two [T*k, H] outputs) alive at once, with headroom for temporaries."""
    n = T * k
    ours = 2 * T * H * elem + n * (H + I) * elem + n * 8
    gmm = n * (3 * H + 4 * I) * elem + n * 16
    return int(1.25 * (ours + gmm))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("no CUDA device: run the smoke mode with --device cpu")
        self.dtype = torch.bfloat16  # torch._grouped_mm takes bf16 only
        self.timer = Timer(self.device, args.budget_ms, *args.iter_range)
        self.elem = 2
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            self.mem_budget = min(args.mem_gb * GIB, total - 4 * GIB)
        else:
            self.mem_budget = args.mem_gb * GIB
        self.deadline = time.monotonic() + args.time_limit_s
        self.results = {"grid": [], "fixed_cost": [], "scenarios": [], "errors": []}

    def log(self, msg):
        print(msg, flush=True)

    def measure(self, label: str, fn, graph: bool = False, warmup: int = 1, graph_calls: int = 1) -> float | None:
        """ms per call, or None (recorded in results["errors"]) when the method fails, so one failure does not
        end a long run."""
        try:
            return graph_ms(fn, calls=graph_calls) if graph else self.timer.median_ms(fn, warmup=warmup)
        except Exception as err:  # noqa: BLE001 - any failure of a measured method is reported, not fatal
            self.results["errors"].append(f"{label}: {type(err).__name__}: {err}")
            self.log(f"  ERROR {label}: {type(err).__name__}: {err}")
            return None

    def generator(self, *key) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(zlib.crc32(repr(key).encode()))

    def ceilings(self):
        cpu = self.device.type == "cpu"
        dense = dense_gemm_tflops(self.timer, 128 if cpu else 8192, self.dtype)
        copy = copy_bandwidth_gbps(self.timer, (16 << 20) if cpu else GIB)
        self.results["ceilings"] = {"dense": dense, "copy": copy, "datasheet_tflops": DATASHEET_TFLOPS}
        self.log(f"dense {dense['n']}³: {dense['tflops']:.1f} TFLOPS · copy: {copy['gbps']:.0f} GB/s (read+write)")

    def weights(self, name, E, H, I):
        g = self.generator("weights", name)
        w13 = torch.randn(E, 2 * I, H, generator=g, device=self.device, dtype=self.dtype).mul_(H**-0.5)
        w2 = torch.randn(E, H, I, generator=g, device=self.device, dtype=self.dtype).mul_(I**-0.5)
        return w13, w2

    def inputs(self, name, T, H, E, k, routing):
        g = self.generator(name, T, routing)
        x = torch.randn(T, H, generator=g, device=self.device, dtype=self.dtype)
        tw, ids = make_routing(routing, T, E, k, g, self.device)
        return x, tw, ids

    def grid_point(self, name, shape, w13, w2, T, routing) -> dict:
        E, k, H, I = shape
        row = {"shape": name, "T": T, "routing": routing}
        weight_bytes = w13.numel() * self.elem + w2.numel() * self.elem
        if weight_bytes + point_bytes(T, k, H, I, self.elem) > self.mem_budget:
            return {**row, "skipped": f"needs > {self.mem_budget / GIB:.0f} GiB"}
        if time.monotonic() > self.deadline:
            return {**row, "skipped": "time limit"}
        x, tw, ids = self.inputs(name, T, H, E, k, routing)
        args = (x, w13, w2, tw, ids)
        hit = experts_hit(ids, E)
        label = f"{name} T={T} {routing}"
        ours = self.measure(f"ours {label}", lambda: fused_moe(*args))
        if ours is None:
            return {**row, "skipped": "error in our op (see errors)"}
        gmm = self.measure(f"grouped_mm {label}", lambda: grouped_mm_moe(*args))
        rel = None if gmm is None else relative_error(fused_moe(*args), grouped_mm_moe(*args))
        loop = None
        if not self.args.no_loop:
            loop = self.measure(f"loop {label}", lambda: per_expert_loop_moe(*args), warmup=0)
        c = self.results["ceilings"]
        tflops = moe_flops(T, k, H, I) / ours / 1e9
        touched = moe_bytes_touched(hit, T, k, H, I, self.elem)
        return {
            **row,
            "experts_hit": hit,
            "ours_ms": ours,
            "gmm_ms": gmm,
            "loop_ms": loop,
            "tflops": tflops,
            "pct_dense": 100 * tflops / c["dense"]["tflops"],
            "pct_datasheet": 100 * tflops / DATASHEET_TFLOPS,
            "bytes_touched": touched,
            "pct_copy_bw": 100 * (touched / ours / 1e6) / c["copy"]["gbps"],
            "x_gmm": None if gmm is None else gmm / ours,
            "x_loop": None if loop is None else loop / ours,
            "rel_err": rel,
            "flagged": rel is not None and not rel <= REL_ERR_FLAG,  # NaN counts as a failure
        }

    def fixed_cost(self, name, shape, w13, w2):
        """Small T: the whole op replayed from a CUDA graph; the same with H = I = 128 (GEMMs negligible, so
        about plan + launches + combine); and the plan kernels and the combine kernel alone."""
        E, k, H, I = shape
        g = self.generator("tiny", name)
        tiny_w13 = torch.randn(E, 2 * TINY_DIM, TINY_DIM, generator=g, device=self.device, dtype=self.dtype)
        tiny_w2 = torch.randn(E, TINY_DIM, TINY_DIM, generator=g, device=self.device, dtype=self.dtype)
        cuda = self.device.type == "cuda"
        for T in self.args.fixed_tokens:
            x, tw, ids = self.inputs(name, T, H, E, k, "balanced")
            x_tiny = torch.randn(T, TINY_DIM, generator=g, device=self.device, dtype=self.dtype)
            label = f"fixed cost {name} T={T}"
            # no graphs on the CPU: eager times of the reference there, to exercise the logic
            ours = self.measure(f"ours {label}", lambda: fused_moe(x, w13, w2, tw, ids), graph=cuda)
            gmm = self.measure(f"grouped_mm {label}", lambda: grouped_mm_moe(x, w13, w2, tw, ids), graph=cuda)
            tiny_fn = lambda: fused_moe(x_tiny, tiny_w13, tiny_w2, tw, ids)  # noqa: E731
            tiny = self.measure(f"ours H=I={TINY_DIM} {label}", tiny_fn, graph=cuda)
            # as in a model's decode graph: one op per layer, the graph's launch shared by LAYERS_IN_GRAPH ops
            tiny_layers = self.measure(f"ours H=I={TINY_DIM} x{LAYERS_IN_GRAPH} {label}", tiny_fn, graph=cuda,
                                       graph_calls=LAYERS_IN_GRAPH)
            plan = plan_layers = combine = combine_layers = None
            if cuda and uses_cuda_kernel(x):
                ws = extension.moe_workspace(T, k, E, H, I, self.device).zero_()
                out = torch.empty_like(x)
                stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
                plan_fn = lambda: extension._C.moe_plan_device(  # noqa: E731
                    ids.data_ptr(), T, k, E, H, I, ws.data_ptr(), 0, stream())
                plan = self.measure(f"plan {label}", plan_fn, graph=True)
                plan_layers = self.measure(f"plan x{LAYERS_IN_GRAPH} {label}", plan_fn, graph=True,
                                           graph_calls=LAYERS_IN_GRAPH)
                dtype_code = 0 if self.dtype == torch.bfloat16 else 1
                combine_fn = lambda: extension._C.moe_combine_device(  # noqa: E731
                    ids.data_ptr(), T, k, E, H, I, ws.data_ptr(), out.data_ptr(), dtype_code, stream())
                combine = self.measure(f"combine {label}", combine_fn, graph=True)
                combine_layers = self.measure(f"combine x{LAYERS_IN_GRAPH} {label}", combine_fn, graph=True,
                                              graph_calls=LAYERS_IN_GRAPH)
            us = {key: None if v is None else 1e3 * v
                  for key, v in (("ours_us", ours), ("gmm_us", gmm), ("ours_tiny_us", tiny),
                                 ("ours_tiny_layers_us", tiny_layers), ("plan_us", plan),
                                 ("plan_layers_us", plan_layers), ("combine_us", combine),
                                 ("combine_layers_us", combine_layers))}
            row = {"shape": name, "T": T, **us}
            self.results["fixed_cost"].append(row)
            self.log(f"  {label}: " + ", ".join(f"{key} {_num(v, '.1f')}" for key, v in us.items()))
        self.results["fixed_cost_mode"] = (
            "CUDA graph replay" if cuda else "eager on CPU (smoke mode; no CUDA graphs)")

    def scenarios(self, name, shape, w13, w2):
        E, k, H, I = shape
        T = self.args.scenario_tokens
        if (w13.numel() + w2.numel()) * self.elem + point_bytes(T, k, H, I, self.elem) > self.mem_budget:
            self.log(f"  scenarios {name} T={T}: do not fit, skipped")
            return
        for scenario in ("balanced", "best", "worst"):
            x, tw, ids = self.inputs(name, T, H, E, k, scenario)
            counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
            label = f"scenario {name} T={T} {scenario}"
            ours = self.measure(f"ours {label}", lambda: fused_moe(x, w13, w2, tw, ids))
            gmm = self.measure(f"grouped_mm {label}", lambda: grouped_mm_moe(x, w13, w2, tw, ids))
            f = moe_flops(T, k, H, I)
            pct = {key: None if v is None else 100 * f / v / 1e9 / DATASHEET_TFLOPS
                   for key, v in (("ours_pct_datasheet", ours), ("gmm_pct_datasheet", gmm))}
            row = {"shape": name, "T": T, "scenario": scenario, "experts_hit": int((counts > 0).sum()),
                   "max_rows": int(counts.max()), "ours_ms": ours, "gmm_ms": gmm, **pct}
            self.results["scenarios"].append(row)
            self.log(f"  {label}: ours {_num(ours, '.3f')} ms ({_num(pct['ours_pct_datasheet'], '.1f')}% of 989), "
                     f"gmm {_num(gmm, '.3f')} ms")

    def run(self):
        started = time.monotonic()
        self.ceilings()
        for name, shape in self.args.shape_table.items():
            E, k, H, I = shape
            if E * 3 * H * I * self.elem > self.mem_budget:
                self.log(f"{name}: weights do not fit, skipped")
                continue
            w13, w2 = self.weights(name, E, H, I)
            self.log(f"{name} (E{E} k{k} H{H} I{I}), weights {w13.numel() * 3 // 2 * self.elem / GIB:.2f} GiB")
            self.fixed_cost(name, shape, w13, w2)
            self.scenarios(name, shape, w13, w2)
            for T in self.args.token_list:
                for routing in self.args.routings:
                    row = self.grid_point(name, shape, w13, w2, T, routing)
                    self.results["grid"].append(row)
                    self.log(format_point(row))
            del w13, w2
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.log(f"done in {time.monotonic() - started:.0f} s")
        return self.results


def _num(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def format_point(r: dict) -> str:
    head = f"  {r['shape']:>13} T={r['T']:<6} {r['routing']:<8}"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    flag = "  ** ERROR > 2e-2 **" if r["flagged"] else ""
    return (f"{head} {r['ours_ms']:9.4f} ms {r['tflops']:7.1f} TFLOPS {r['pct_dense']:5.1f}% dense "
            f"{r['pct_datasheet']:5.1f}% of 989  BW {r['pct_copy_bw']:5.1f}%  "
            f"gmm {_num(r['gmm_ms'], '.4f')} ms ({_num(r['x_gmm'], '.2f')}×)  "
            f"loop {_num(r['loop_ms'], '.3f')} ms ({_num(r['x_loop'], '.2f')}×)  err {_num(r['rel_err'], '.1e')}{flag}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fp8" in argv:  # FP8 weights: its own grid, peers and ceilings
        from benchmarks.bench_moe_fp8 import main as fp8_main

        return fp8_main([a for a in argv if a != "--fp8"])
    args = parse_args(argv)
    bench = Bench(args)
    impl = extension.describe()
    probe = torch.empty(1, 8, device=bench.device, dtype=bench.dtype)
    if bench.device.type == "cuda" and not uses_cuda_kernel(probe):
        print(f"WARNING: fused_moe runs the pure-torch reference here ({impl})", flush=True)
    print(f"ours: {impl}", flush=True)
    results = bench.run()
    recorded = {k: v for k, v in vars(args).items() if k not in ("shape_table", "out_dir")}
    results["meta"] = run_metadata(REPO, bench.device, impl, recorded)
    json_path, md_path = write_results(results, args.out_dir, args.quick)
    print(f"wrote {json_path} and {md_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
