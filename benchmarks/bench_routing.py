#!/usr/bin/env python
"""What a DeepSeek / GLM MoE layer spends outside the experts op, to decide what to fuse (issue 23, item 1).

Per model shape and token count T, each timed from a CUDA graph holding `--layers` calls (as a decode graph holds one
per layer), on one layer's random weights:
- `route`: the float32 router GEMM + group-limited top-k (model/kernels/routing.py `grouped_topk`), as the block runs;
- `topk` : grouped_topk alone on given logits, and `softmax`: the plain softmax_topk of the same E and k (baseline);
- `experts`: fused_moe over the routed experts; `shared`: the shared expert as a dense SwiGLU MLP (two GEMMs);
- `appended`: the alternative to a separate shared pass — the n_shared shared experts appended to the experts'
  weights as experts E..E+n-1 that every token takes with weight 1 (a SwiGLU MLP of n·I columns is exactly the sum of
  n experts of I columns), so one fused_moe with k+n slots does both. Its output is checked against experts+shared.
The verdict per point: appended vs experts + shared, and routing as a share of the whole layer.

    python benchmarks/bench_routing.py                       # H100/H200: all shapes, T in 1 16 64 256 4096
    python benchmarks/bench_routing.py --shapes glm-4.5-air --tokens 1 64
    python benchmarks/bench_routing.py --device cpu --quick  # smoke test of the script on a tiny shape
Results: printed, and benchmarks/results/bench_routing_<date>_<device>.json with --out DIR.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_report import run_metadata
from benchmarks.bench_timing import graph_ms
from model.kernels import extension, fused_moe, grouped_topk, softmax_topk

REPO = Path(__file__).resolve().parents[1]
# name: (H, I, E, k, n_shared, scoring, n_group, topk_group, group_score, routed_scaling_factor), from config.json
SHAPES = {
    "glm-4.5-air": (4096, 1408, 128, 8, 1, "sigmoid", 1, 1, "top2_sum", 1.0),
    "glm-4.5": (5120, 1536, 160, 8, 1, "sigmoid", 1, 1, "top2_sum", 2.5),
    "deepseek-v3": (7168, 2048, 256, 8, 1, "sigmoid", 8, 4, "top2_sum", 2.5),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 2, "softmax", 1, 1, "max", 1.0),
}
SMOKE_SHAPES = {"tiny-grouped": (64, 32, 16, 4, 2, "sigmoid", 4, 2, "top2_sum", 2.5)}
TOKENS = (1, 16, 64, 256, 4096)


class Layer:
    """One MoE layer's random weights; the shared expert stored as n_shared extra experts after the routed ones, so
    the separate pass and the appended variant read the very same bytes."""

    def __init__(self, shape, device, dtype, gen):
        H, I, E, k, n, scoring, groups, topk_groups, group_score, scale = shape
        self.shape, self.k, self.n = shape, k, n
        w = lambda *s: (torch.randn(*s, generator=gen, device=device) / s[-1] ** 0.5).to(dtype)  # noqa: E731
        self.router = w(E, H)
        self.bias = torch.randn(E, generator=gen, device=device) * 0.01 if scoring == "sigmoid" else None
        self.w13_all, self.w2_all = w(E + n, 2 * I, H), w(E + n, H, I)  # [E+n, 2I, H], [E+n, H, I]
        self.w13, self.w2 = self.w13_all[:E], self.w2_all[:E]  # the routed experts (contiguous views)
        shared = self.w13_all[E:]  # [n, 2I, H]: as one MLP of n*I columns, gate rows then up rows
        self.shared_gate_up = torch.cat([shared[:, :I].reshape(n * I, H), shared[:, I:].reshape(n * I, H)])
        self.shared_down = self.w2_all[E:].permute(1, 0, 2).reshape(H, n * I)  # [H, n*I]
        self.routing = dict(scoring=scoring, correction_bias=self.bias, num_groups=groups, topk_groups=topk_groups,
                            group_score=group_score, renormalize=True, scaling_factor=scale)

    def route(self, x):
        return grouped_topk(F.linear(x.float(), self.router.float()), self.k, **self.routing)

    def shared(self, x):
        gate, up = F.linear(x, self.shared_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.shared_down)

    def appended_routing(self, weights, ids):
        """[T, k+n]: the routed slots, then every shared expert with weight 1."""
        T, E = ids.shape[0], self.router.shape[0]
        shared_ids = torch.arange(E, E + self.n, dtype=torch.int32, device=ids.device).expand(T, self.n)
        return torch.cat([weights, torch.ones(T, self.n, device=ids.device)], 1), torch.cat([ids, shared_ids], 1)


def timed_ms(fn, device, layers: int) -> float:
    if device.type == "cuda":
        return graph_ms(fn, replays=20, calls=layers)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def measure(name, layer: Layer, T, device, dtype, layers, gen) -> dict:
    x = torch.randn(T, layer.shape[0], generator=gen, device=device).to(dtype)
    logits = F.linear(x.float(), layer.router.float())
    weights, ids = layer.route(x)
    w_app, ids_app = layer.appended_routing(weights, ids)
    separate = fused_moe(x, layer.w13, layer.w2, weights, ids) + layer.shared(x)
    appended = fused_moe(x, layer.w13_all, layer.w2_all, w_app, ids_app)
    error = float((appended.float() - separate.float()).abs().max() / separate.float().abs().max())
    ms = {
        "route": timed_ms(lambda: layer.route(x), device, layers),
        "topk": timed_ms(lambda: grouped_topk(logits, layer.k, **layer.routing), device, layers),
        "softmax": timed_ms(lambda: softmax_topk(logits, layer.k, True), device, layers),
        "experts": timed_ms(lambda: fused_moe(x, layer.w13, layer.w2, weights, ids), device, layers),
        "shared": timed_ms(lambda: layer.shared(x), device, layers),
        "appended": timed_ms(lambda: fused_moe(x, layer.w13_all, layer.w2_all, w_app, ids_app), device, layers),
    }
    separate_ms = ms["experts"] + ms["shared"]
    return dict(shape=name, T=T, **{f"{k}_ms": v for k, v in ms.items()}, appended_vs_separate=ms["appended"] /
                separate_ms, route_share=ms["route"] / (ms["route"] + separate_ms), appended_rel_err=error)


def row_text(r: dict) -> str:
    return (f"{r['shape']:>17} T={r['T']:<5} route {r['route_ms']:.4f} (topk {r['topk_ms']:.4f}, softmax "
            f"{r['softmax_ms']:.4f})  experts {r['experts_ms']:.4f} + shared {r['shared_ms']:.4f} ms  appended "
            f"{r['appended_ms']:.4f} ms = {r['appended_vs_separate']:.2f}x separate  routing "
            f"{100 * r['route_share']:.1f}% of the layer  err {r['appended_rel_err']:.1e}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=None, help=f"of {', '.join(SHAPES)} (default all)")
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--layers", type=int, default=8, help="calls per captured graph (decode graphs: one per layer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="T in 1 64 only")
    p.add_argument("--out", default=None, help="folder for the JSON record")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    table = SMOKE_SHAPES if cpu else SHAPES
    names = args.shapes or list(table)
    tokens = args.tokens or ((1, 16) if cpu else (1, 64) if args.quick else TOKENS)
    dtype = torch.float32 if cpu else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in names:
        layer = Layer(table[name], device, dtype, gen)
        for T in tokens:
            rows.append(measure(name, layer, T, device, dtype, 1 if cpu else args.layers, gen))
            print(row_text(rows[-1]), flush=True)
        del layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = dict(meta=run_metadata(REPO, device, extension.describe(), vars(args)), grid=rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bench_routing_{results['meta']['date'][:10]}_{device.type}.json"
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
