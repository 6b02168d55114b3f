#!/usr/bin/env python
"""The gpt-oss epilogues' cost (issue 24): `fused_moe` with `swiglu_oai` + both expert biases against SiLU without
biases at the same shape, same inputs, same routing — the ratio is what the fused bias loads and clamped SwiGLU cost
(the issue's bar: <= 1.03). Shapes: gpt-oss-20b (E32 k4 H2880 I2880) and -120b (E128). Each point also checks
both against the float32 reference of its own activation (relative error; > 2e-2 is flagged).

    python benchmarks/bench_moe_epilogue.py                 # H100/H200, ~2 min
    python benchmarks/bench_moe_epilogue.py --quick         # ~30 s
    python benchmarks/bench_moe_epilogue.py --device cpu    # smoke test of the script on tiny shapes
Results: benchmarks/results/bench_moe_epilogue_<date>_<device>.json and a table on stdout.
"""

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.bench_report import run_metadata  # noqa: E402
from benchmarks.bench_timing import Timer  # noqa: E402
from benchmarks.moe_cases import (GPT_OSS_EXPERT_SHAPES, make_routing, moe_flops, relative_error,  # noqa: E402
                                  swiglu_oai_case)
from model.kernels import extension, fused_moe, fused_moe_reference  # noqa: E402

TOKENS, QUICK_TOKENS, SMOKE_TOKENS = (1, 16, 128, 512, 2048, 8192), (1, 128, 4096), (1, 16)
ROUTINGS = ("balanced", "zipf")
SMOKE_SHAPES = {"tiny-oss": (8, 4, 64, 64)}
REL_ERR_FLAG = 2e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", help=f"comma list of {', '.join(GPT_OSS_EXPERT_SHAPES)} (or 'all')")
    p.add_argument("--tokens", default=None, help="comma list of T")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, reference path")
    p.add_argument("--budget-ms", type=float, default=None, help="measured time per variant per point")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    smoke = args.device == "cpu"
    table = SMOKE_SHAPES if smoke else GPT_OSS_EXPERT_SHAPES
    names = list(table) if args.shapes == "all" or smoke else [s.strip() for s in args.shapes.split(",")]
    if unknown := [n for n in names if n not in table]:
        p.error(f"unknown shapes {unknown}; choose from {list(table)}")
    args.shape_table = {n: table[n] for n in names}
    default = SMOKE_TOKENS if smoke else QUICK_TOKENS if args.quick else TOKENS
    args.token_list = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else default
    args.budget_ms = args.budget_ms or (2.0 if smoke else 40.0 if args.quick else 100.0)
    return args


def run(args) -> dict:
    device = torch.device(args.device)
    timer = Timer(device, args.budget_ms, *((1, 3) if device.type == "cpu" else (3, 100)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, (E, k, H, I) in args.shape_table.items():
        case = swiglu_oai_case(E, H, I, torch.Generator(device=device).manual_seed(0), dtype)
        for T in args.token_list:
            for routing in ROUTINGS:
                tw, ids = make_routing(routing, T, E, k, torch.Generator(device=device).manual_seed(T))
                x = torch.randn(T, H, device=device, dtype=dtype)
                silu = lambda: fused_moe(x, case["w13"], case["w2"], tw, ids)  # noqa: E731
                oai = lambda: fused_moe(x, case["w13"], case["w2"], tw, ids, activation="swiglu_oai",  # noqa: E731
                                        w13_bias=case["w13_bias"], w2_bias=case["w2_bias"])
                ms_silu, ms_oai = timer.interleaved_median_ms([silu, oai])  # in turns: drift hits both alike
                errors = {}
                for label, fn, kw in (("silu", silu, {}), ("swiglu_oai", oai, dict(
                        activation="swiglu_oai", w13_bias=case["w13_bias"], w2_bias=case["w2_bias"]))):
                    ref = fused_moe_reference(x, case["w13"], case["w2"], tw, ids, compute_dtype=torch.float32, **kw)
                    errors[label] = relative_error(fn(), ref)
                flops = moe_flops(T, k, H, I)
                rows.append(dict(shape=name, T=T, routing=routing, ms_silu=ms_silu, ms_swiglu_oai=ms_oai,
                                 ratio=ms_oai / ms_silu, tflops_swiglu_oai=flops / ms_oai / 1e9,
                                 rel_err_silu=errors["silu"], rel_err_swiglu_oai=errors["swiglu_oai"]))
                flag = " !" if max(errors.values()) > REL_ERR_FLAG else ""
                print(f"{name:13s} T={T:6d} {routing:8s} silu {ms_silu:8.3f} ms  swiglu_oai+bias {ms_oai:8.3f} ms  "
                      f"ratio {ms_oai / ms_silu:5.3f}  err {errors['swiglu_oai']:.1e}{flag}", flush=True)
    impl = "CUDA sm_90a" if device.type == "cuda" and extension.available_for(device) else "pure-torch reference"
    return dict(meta=run_metadata(REPO, device, impl, {k: str(v) for k, v in vars(args).items()}), rows=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    ratios = [r["ratio"] for r in results["rows"]]
    print(f"swiglu_oai+bias / silu: median {sorted(ratios)[len(ratios) // 2]:.3f}, max {max(ratios):.3f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", results["meta"]["device"]).strip("-").lower()
    path = args.out_dir / f"bench_moe_epilogue_{stamp}_{slug}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
