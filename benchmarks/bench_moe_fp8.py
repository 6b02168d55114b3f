#!/usr/bin/env python
"""FP8 MoE layer benchmark (issue 16): our FP8 op (e4m3 weights with 128x128 block scales, activations quantised
per token and 128-column group) against our bf16 op, the `torch._scaled_grouped_mm` pipeline (rowwise FP8) and the
bf16 `torch._grouped_mm` pipeline, on the same random bf16 weights; ceilings measured in the same run:
`torch._scaled_mm` dense FP8 8192³ (block recipe where cuBLAS takes it), cuBLAS bf16 8192³ and a device copy.

Grid: DeepSeek-V3, Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral expert shapes × T ∈ {1 … 32768} × balanced / zipf.
Times are medians of eager calls with L2 flushed before each (bench_timing.Timer); points with T ≤ 64 are also
timed from CUDA graphs (the decode setting) against the FP8 byte floor: FP8 weights + scales of the experts hit
÷ copy bandwidth; one graph per routing of moe_cases.expert_rotations, replayed in turn, so no replay finds its
experts' weights in L2 from the one before (Qwen3 at T=1 reads 37.7 MB, under the 50 MB L2). FP8 TFLOPS are
compared with the FP8 ceiling only, bf16 with the bf16 one.

    python benchmarks/bench_moe_fp8.py [--quick] [--shapes deepseek-v3,...] [--tokens 1,64,8192]
Results: benchmarks/results/bench_moe_fp8_<date>_<device>.{json,md}.
"""

import argparse
import datetime
import json
import re
import sys
import time
import zlib
from pathlib import Path

import torch

from benchmarks.bench_report import run_metadata
from benchmarks.bench_timing import Timer, copy_bandwidth_gbps, dense_gemm_tflops, graph_cycle_ms
from benchmarks.moe_baselines import grouped_mm_moe
from benchmarks.moe_baselines_fp8 import RowwiseFp8Experts, promotion_error, scaled_grouped_mm_moe, scaled_mm_ceiling
from benchmarks.moe_cases import FP8_EXPERT_SHAPES as SHAPES
from benchmarks.moe_cases import expert_rotations, experts_hit, make_routing, moe_flops, relative_error
from model.kernels import extension, fused_moe
from model.kernels.fp8 import quantize_fp8_blocks

REPO = Path(__file__).resolve().parents[1]
TOKENS = (1, 16, 64, 512, 2048, 8192, 32768)
QUICK_TOKENS = (1, 64, 2048, 8192)
ROUTINGS = ("balanced", "zipf")
DECODE_MAX_T = 64
L2_BYTES = 50 << 20  # the H100's; the H200's is the same size


def fp8_weight_bytes(hit, H, I):
    """FP8 weights and their 128x128 scales of the experts hit: what a decode step must stream."""
    return hit * (3 * H * I + 4 * (2 * I // 128 * H // 128 + H // 128 * I // 128))


class Fp8Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda")
        self.timer = Timer(self.device, args.budget_ms, 3, 100)
        self.deadline = time.monotonic() + args.time_limit_s
        self.results = {"grid": [], "errors": []}

    def log(self, msg):
        print(msg, flush=True)

    def measure(self, label, fn, graph=False):
        try:
            return graph_cycle_ms(fn) if graph else self.timer.median_ms(fn)  # graph: a list of fns
        except Exception as err:  # noqa: BLE001 - one failing method must not end the run
            self.results["errors"].append(f"{label}: {type(err).__name__}: {str(err)[:300]}")
            self.log(f"  ERROR {label}: {type(err).__name__}: {str(err)[:300]}")
            return None

    def ceilings(self):
        c = {
            "copy": copy_bandwidth_gbps(self.timer, 1 << 30),
            "dense_bf16": dense_gemm_tflops(self.timer, 8192, torch.bfloat16),
            "dense_fp8": scaled_mm_ceiling(self.timer, 8192),
            "promotion": [promotion_error(K, self.device) for K in (2048, 7168)],
        }
        self.results["ceilings"] = c
        f8 = c["dense_fp8"]
        self.log(f"copy {c['copy']['gbps']:.0f} GB/s · bf16 dense {c['dense_bf16']['tflops']:.0f} TFLOPS · "
                 f"fp8 dense {f8['tflops'] or 0:.0f} TFLOPS ({f8['recipe']}; refused: {f8['refused']})")
        for p in c["promotion"]:
            self.log(f"  fp8 accumulation, K={p['K']}: fast_accum err {p['fast_accum']:.2e}, "
                     f"promoted {p['promoted']:.2e}")

    def weights(self, name, E, H, I):
        g = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        w13 = torch.randn(E, 2 * I, H, generator=g, device=self.device, dtype=torch.bfloat16).mul_(H**-0.5)
        w2 = torch.randn(E, H, I, generator=g, device=self.device, dtype=torch.bfloat16).mul_(I**-0.5)
        q13 = torch.empty_like(w13, dtype=torch.float8_e4m3fn)
        q2 = torch.empty_like(w2, dtype=torch.float8_e4m3fn)
        s13 = torch.empty(E, 2 * I // 128, H // 128, device=self.device)
        s2 = torch.empty(E, H // 128, I // 128, device=self.device)
        for e in range(E):  # one expert at a time: no float32 copy of the whole tensor
            q13[e], s13[e] = quantize_fp8_blocks(w13[e])
            q2[e], s2[e] = quantize_fp8_blocks(w2[e])
        return {"bf16": (w13, w2), "fp8": (q13, s13, q2, s2), "rowwise": RowwiseFp8Experts(w13, w2)}

    def point(self, name, shape, w, T, routing) -> dict:
        E, k, H, I = shape
        row = {"shape": name, "T": T, "routing": routing}
        if time.monotonic() > self.deadline:
            return {**row, "skipped": "time limit"}
        g = torch.Generator(device=self.device).manual_seed(zlib.crc32(repr((name, T, routing)).encode()))
        x = torch.randn(T, H, generator=g, device=self.device, dtype=torch.bfloat16)
        tw, ids = make_routing(routing, T, E, k, g, self.device)
        w13, w2 = w["bf16"]
        q13, s13, q2, s2 = w["fp8"]
        fp8 = lambda: fused_moe(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)  # noqa: E731
        bf16 = lambda: fused_moe(x, w13, w2, tw, ids)  # noqa: E731
        label = f"{name} T={T} {routing}"
        ours = self.measure(f"ours fp8 {label}", fp8)
        if ours is None:
            return {**row, "skipped": "error in our FP8 op (see errors)"}
        ours16 = self.measure(f"ours bf16 {label}", bf16)
        sgmm = self.measure(f"scaled_grouped_mm {label}", lambda: scaled_grouped_mm_moe(x, w["rowwise"], tw, ids))
        gmm = self.measure(f"grouped_mm {label}", lambda: grouped_mm_moe(x, w13, w2, tw, ids))
        hit = experts_hit(ids, E)
        c = self.results["ceilings"]
        tflops = moe_flops(T, k, H, I) / ours / 1e9
        floor_ms = fp8_weight_bytes(hit, H, I) / (c["copy"]["gbps"] * 1e6)
        res = {**row, "experts_hit": hit, "ours_ms": ours, "bf16_ms": ours16, "sgmm_ms": sgmm, "gmm_ms": gmm,
               "tflops": tflops, "bf16_tflops": None if ours16 is None else moe_flops(T, k, H, I) / ours16 / 1e9,
               "pct_fp8_dense": None if not c["dense_fp8"]["tflops"] else 100 * tflops / c["dense_fp8"]["tflops"],
               "pct_copy_bw": 100 * floor_ms / ours, "floor_ms": floor_ms,
               "x_bf16": None if ours16 is None else ours16 / ours, "x_sgmm": None if sgmm is None else sgmm / ours,
               "x_gmm": None if gmm is None else gmm / ours,
               "err_vs_bf16_op": relative_error(fp8(), bf16())}
        if T <= DECODE_MAX_T:
            rot = expert_rotations(ids, E, fp8_weight_bytes(1, H, I), 4 * L2_BYTES)
            rot16 = expert_rotations(ids, E, 3 * H * I * 2, 4 * L2_BYTES)
            graph = self.measure(f"ours fp8 graph {label}", [
                lambda r=r: fused_moe(x, q13, q2, tw, r, w13_scale=s13, w2_scale=s2) for r in rot], graph=True)
            graph16 = self.measure(f"ours bf16 graph {label}", [
                lambda r=r: fused_moe(x, w13, w2, tw, r) for r in rot16], graph=True)
            res.update(graph_ms=graph, bf16_graph_ms=graph16,
                       x_floor=None if graph is None else graph / floor_ms)
        return res

    def run(self):
        started = time.monotonic()
        self.ceilings()
        for name in self.args.shapes:
            shape = SHAPES[name]
            E, k, H, I = shape
            w = self.weights(name, E, H, I)
            self.log(f"{name} (E{E} k{k} H{H} I{I})")
            for T in self.args.tokens:
                for routing in ROUTINGS:
                    r = self.point(name, shape, w, T, routing)
                    self.results["grid"].append(r)
                    self.log(format_point(r))
            del w
            torch.cuda.empty_cache()
        self.log(f"done in {time.monotonic() - started:.0f} s")
        return self.results


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def format_point(r) -> str:
    head = f"  {r['shape']:>15} T={r['T']:<6} {r['routing']:<8}"
    if "skipped" in r:
        return f"{head} skipped ({r['skipped']})"
    decode = (f"  graph {_f(r.get('graph_ms'), '.4f')} ms = {_f(r.get('x_floor'), '.2f')}× floor"
              if "graph_ms" in r else "")
    return (f"{head} fp8 {r['ours_ms']:8.4f} ms {r['tflops']:7.1f} TF ({_f(r['pct_fp8_dense'], '.1f')}% fp8 dense, "
            f"BW {r['pct_copy_bw']:5.1f}%)  ×bf16 {_f(r['x_bf16'], '.2f')}  ×sgmm {_f(r['x_sgmm'], '.2f')}  "
            f"×gmm {_f(r['x_gmm'], '.2f')}  err {r['err_vs_bf16_op']:.1e}{decode}")


def markdown(results) -> str:
    m, c = results["meta"], results["ceilings"]
    f8 = c["dense_fp8"]
    lines = [
        f"# FP8 MoE layer benchmark — {m['device']}", "",
        f"date {m['date']} · commit `{m['commit']}` · torch {m['torch']} (CUDA {m['cuda']}) · ours: {m['ours']}", "",
        f"Ceilings in this run: `torch._scaled_mm` FP8 dense {f8['n']}³ = {_f(f8['tflops'], '.0f')} TFLOPS "
        f"({f8['recipe']}); cuBLAS bf16 8192³ = {c['dense_bf16']['tflops']:.0f} TFLOPS; copy = "
        f"{c['copy']['gbps']:.0f} GB/s (read + write).", "",
        "FP8 accumulation inside the tensor cores over long K (`torch._scaled_mm`, random e4m3, vs float64): " +
        "; ".join(f"K={p['K']}: fast_accum {p['fast_accum']:.2e}, promoted {p['promoted']:.2e}" for p in c["promotion"]),
        "", "*% fp8*: our FP8 TFLOPS ÷ the FP8 dense ceiling. *BW %*: FP8 bytes (weights + scales of the experts hit) "
        "÷ time, as % of copy bandwidth. *× X*: X's time ÷ ours (> 1: we are faster). bf16 TF: our bf16 op. "
        "*graph*: T ≤ 64 replayed from a CUDA graph; *× floor*: graph time ÷ FP8 byte floor. "
        "*err*: ‖ours fp8 − ours bf16‖ / ‖ours bf16‖ (the quantisation's effect).", "",
        "| shape | T | routing | hit | fp8 ms | fp8 TF | % fp8 | BW % | bf16 ms | bf16 TF | sgmm ms | gmm ms "
        "| × bf16 | × sgmm | × gmm | graph ms | × floor | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["grid"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['T']} | {r['routing']} | skipped: {r['skipped']} |" + "|" * 14)
            continue
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['routing']} | {r['experts_hit']} | {r['ours_ms']:.4f} | "
            f"{r['tflops']:.1f} | {_f(r['pct_fp8_dense'], '.1f')} | {r['pct_copy_bw']:.1f} | "
            f"{_f(r['bf16_ms'], '.4f')} | {_f(r['bf16_tflops'], '.1f')} | {_f(r['sgmm_ms'], '.4f')} | "
            f"{_f(r['gmm_ms'], '.4f')} | {_f(r['x_bf16'], '.2f')} | {_f(r['x_sgmm'], '.2f')} | {_f(r['x_gmm'], '.2f')} | "
            f"{_f(r.get('graph_ms'), '.4f')} | {_f(r.get('x_floor'), '.2f')} | {r['err_vs_bf16_op']:.1e} |")
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-ms", type=float, default=None)
    p.add_argument("--time-limit-s", type=float, default=None)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    args.tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else (
        QUICK_TOKENS if args.quick else TOKENS)
    args.budget_ms = args.budget_ms or (30.0 if args.quick else 80.0)
    args.time_limit_s = args.time_limit_s or (200.0 if args.quick else 420.0)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or not extension.available_for(torch.device("cuda")):
        sys.exit(f"needs a Hopper GPU and the built extension ({extension.describe()})")
    bench = Fp8Bench(args)
    results = bench.run()
    recorded = {k: v for k, v in vars(args).items() if k != "out_dir"}
    results["meta"] = run_metadata(REPO, bench.device, extension.describe(), recorded)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", results["meta"]["device"]).strip("-").lower()
    stem = args.out_dir / f"bench_moe_fp8_{stamp}_{slug}{'_quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
