#!/usr/bin/env python
"""The plain routers on the GPU: the one-kernel Triton path of `softmax_topk` / `topk_softmax` against their torch
reference (float32 cast, softmax, torch.topk, renormalise, id cast: up to seven kernels), issue 21.

Each timed from a CUDA graph holding `--layers` calls on bf16 logits [T, E], as a decode graph holds one per MoE
layer; the difference is what the kernel saves per layer.

    python benchmarks/bench_plain_router.py                  # the presets' routers, T in 1 64 1024
    python benchmarks/bench_plain_router.py --tokens 1 8 --layers 48
GPU only (CUDA graphs).
"""

import argparse
import sys

import torch

from benchmarks.bench_timing import graph_ms
from model.kernels import routing

# name: (E, k, router, renormalize), from each model's config.json
ROUTERS = {
    "olmoe-1b-7b": (64, 8, "softmax_topk", False),
    "qwen1.5-moe-a2.7b": (60, 4, "softmax_topk", False),
    "qwen3-30b-a3b": (128, 8, "softmax_topk", True),
    "gpt-oss-20b": (32, 4, "topk_softmax", None),
    "gpt-oss-120b": (128, 4, "topk_softmax", None),
}


def callers(logits: torch.Tensor, k: int, router: str, renormalize: bool | None):
    """(dispatching call, torch reference call) of one router on fixed logits."""
    if router == "topk_softmax":
        return lambda: routing.topk_softmax(logits, k), lambda: routing.topk_softmax_reference(logits, k)
    return (lambda: routing.softmax_topk(logits, k, renormalize),
            lambda: routing.softmax_topk_reference(logits, k, renormalize))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--layers", type=int, default=16, help="calls per captured graph (MoE layers per step)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_plain_router needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name())
    rows = []
    for name, (E, k, router, renormalize) in ROUTERS.items():
        for T in args.tokens:
            logits = torch.randn(T, E, device="cuda", generator=gen).bfloat16()
            fast, reference = callers(logits, k, router, renormalize)
            path = "triton" if routing.uses_triton_router(logits, k) else "torch"
            ref_us = graph_ms(reference, replays=200, calls=args.layers) * 1e3
            fast_us = graph_ms(fast, replays=200, calls=args.layers) * 1e3
            rows.append(dict(router=name, E=E, k=k, T=T, path=path, reference_us=ref_us, dispatched_us=fast_us))
            print(f"{name:18s} E={E:3d} k={k} T={T:5d}: torch {ref_us:6.2f} us, {path} {fast_us:6.2f} us, "
                  f"saved {ref_us - fast_us:6.2f} us per layer", flush=True)
    return rows


if __name__ == "__main__":
    main()
