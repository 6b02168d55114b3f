#!/usr/bin/env python
"""The fused router (model/kernels/triton_router_gemv.py: the router's linear and its routing in one launch) against
the unfused path (cuBLAS linear, then the one-kernel Triton router), issue 21.

Each timed from a CUDA graph holding `--layers` calls on bf16 x [T, H] and the preset's router weight, as a decode
graph holds one per MoE layer; the difference is what fusing saves per layer. `--splits` sweeps the split count
beside the plan's (the plan is marked *), `--warps` overrides the warps per program.

    python benchmarks/bench_fused_router.py                         # the presets, T in 1 2 4 8 16
    python benchmarks/bench_fused_router.py --tokens 1 --splits 8 16 32 64
    python benchmarks/bench_fused_router.py --tokens 1 --warps 4
GPU only (CUDA graphs).
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.bench_timing import graph_ms
from model.kernels import routing, triton_router_gemv

# name: (E, H, k, router, renormalize, router bias), from each model's config.json
ROUTERS = {
    "olmoe-1b-7b": (64, 2048, 8, "softmax_topk", False, False),
    "qwen1.5-moe-a2.7b": (60, 2048, 4, "softmax_topk", False, False),
    "qwen3-30b-a3b": (128, 2048, 8, "softmax_topk", True, False),
    "gpt-oss-20b": (32, 2880, 4, "topk_softmax", False, True),
    "gpt-oss-120b": (128, 2880, 4, "topk_softmax", False, True),
}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--layers", type=int, default=16, help="calls per captured graph (MoE layers per step)")
    parser.add_argument("--splits", type=int, nargs="*", default=[], help="split counts to time beside the plan's")
    parser.add_argument("--warps", type=int, default=None, help="warps per program (default: launch_warps)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_fused_router needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name())
    rows = []
    for name, (E, H, k, router, renormalize, has_bias) in ROUTERS.items():
        w = (torch.randn(E, H, device="cuda", generator=gen) * 0.02).bfloat16()
        b = (torch.randn(E, device="cuda", generator=gen) * 0.1).bfloat16() if has_bias else None
        softmax_all = router == "softmax_topk"
        for T in args.tokens:
            x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()

            def unfused():
                logits = F.linear(x, w, b)
                return routing.softmax_topk(logits, k, renormalize) if softmax_all else routing.topk_softmax(logits, k)

            unfused_us = graph_ms(unfused, replays=200, calls=args.layers) * 1e3
            planned = triton_router_gemv.plan(T, E, H)[0]
            for splits in [planned] + [s for s in args.splits if s != planned]:
                fused = lambda: triton_router_gemv.fused_route(x, w, b, k, softmax_all, renormalize,  # noqa: E731
                                                               splits=splits, warps=args.warps)
                try:
                    fused()
                except ValueError as err:  # past the reducer's budget
                    print(f"{name:18s} T={T:3d} splits={splits:3d}: {err}")
                    continue
                fused_us = graph_ms(fused, replays=200, calls=args.layers) * 1e3
                rows.append(dict(router=name, E=E, H=H, k=k, T=T, splits=splits, unfused_us=unfused_us,
                                 fused_us=fused_us))
                mark = "*" if splits == planned else " "
                print(f"{name:18s} E={E:3d} H={H} T={T:3d} splits={splits:3d}{mark}: unfused {unfused_us:6.2f} us, "
                      f"fused {fused_us:6.2f} us, saved {unfused_us - fused_us:6.2f} us per layer", flush=True)
    return rows


if __name__ == "__main__":
    main()
