#!/usr/bin/env python
"""What /metrics costs the host (issue 21), CPU only: `ServiceMetrics` with a real model's MoE layout, fed snapshots
the way the engine thread publishes them (cumulative per-expert counts that grow, now and then dip by the pad
token's correction, and a recent window), and scraped by the function the /metrics route calls.

Times, in ms (median / p90 over --repeats):
- publish: one `_publish` of the engine thread (engine gauges + one MoE snapshot folded in);
- scrape, new snapshot: a scrape after --publishes-per-scrape publishes (2 s of scrape interval / 0.25 s of
  publish interval in bench_serve: 8), so the per-expert text is rendered afresh;
- scrape, cached: a second scrape before the next publish.
Every scrape holds the GIL against the engine thread for about its whole time (pure Python).

    python benchmarks/bench_metrics_scrape.py --layout qwen3 --repeats 30
    PYTHONPATH=/tmp/old-tree python benchmarks/bench_metrics_scrape.py --layout qwen3   (an older checkout's service/)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

import service
from model.engine import EngineStats, MoeStatsSnapshot
from model.presets import PRESETS
from service.loadgen.report import percentile
from service.metrics import MoeLayout, ServiceMetrics
from service.metrics_vllm import vllm_registry

try:
    from service.metrics_text import scrape_text
except ImportError:  # a checkout before the cached per-expert text: what its /metrics route did
    def scrape_text(*registries: CollectorRegistry) -> bytes:
        return b"".join(generate_latest(registry) for registry in registries)

LAYOUTS = {"qwen3": "qwen3-30b-a3b", "olmoe": "olmoe-1b-7b"}  # every layer of both is an MoE layer


def moe_layout(preset: str) -> tuple[int, int]:
    config = PRESETS[preset]
    return int(config["num_hidden_layers"]), int(config["num_experts"])


class SnapshotStream:
    """MoE snapshots as the engine makes them: fresh lists each time, totals growing by ~`per_publish` tokens per
    expert (top-k slots), a few experts a publish dipping by one (the pad token's correction)."""

    def __init__(self, layers: int, experts: int, start: int, per_publish: int, rng: random.Random):
        self.rng, self.per_publish = rng, per_publish
        self.totals = [[rng.randint(start // 2, start) for _ in range(experts)] for _ in range(layers)]
        self.flops = 0.0

    def next(self) -> MoeStatsSnapshot:
        rng, high = self.rng, 2 * self.per_publish
        window = [[rng.randint(0, high) if rng.random() > 0.05 else 0 for _ in row] for row in self.totals]
        self.totals = [[max(0, t + w - (rng.random() < 0.01)) for t, w in zip(row, wrow)]
                       for row, wrow in zip(self.totals, window)]
        self.flops += 1e12
        return MoeStatsSnapshot("NVIDIA H200", self.flops, [(0.004, 2e12)], [list(r) for r in self.totals], window,
                                list(range(len(self.totals))))


def quantiles_ms(seconds: list[float]) -> str:
    ms = [s * 1e3 for s in seconds]
    p90 = percentile(ms, 90)  # linear interpolation, as the load generator's
    return f"median {statistics.median(ms):8.3f} ms   p90 {p90:8.3f} ms   (n={len(ms)})"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="qwen3")
    parser.add_argument("--repeats", type=int, default=30, help="scrapes of each kind timed")
    parser.add_argument("--publishes-per-scrape", type=int, default=8)
    parser.add_argument("--start-count", type=int, default=10**6,
                        help="per-expert cumulative tokens at the start (>= 10**7 makes floatToGoString use its "
                             "slower exponent form)")
    parser.add_argument("--tokens-per-publish", type=int, default=50, help="mean new tokens per expert a publish")
    parser.add_argument("--vllm-metric-names", action="store_true", help="also the vllm:* mirror, as the flag")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    prometheus_client.disable_created_metrics()  # as the server (service/cli.py)
    layers, experts = moe_layout(LAYOUTS[args.layout])
    metrics = ServiceMetrics(LAYOUTS[args.layout], max_model_len=40960)
    metrics.configure_moe(MoeLayout(layer_labels=[str(i) for i in range(layers)], experts_per_layer=[experts] * layers,
                                    device_name="NVIDIA H200", peak_flops=989e12, expert_counters=True))
    for seconds in (0.01, 0.2, 3.0):  # the request histograms and counters hold a few observations, as in a run
        for histogram in (metrics.ttft, metrics.e2e, metrics.queue_time, metrics.inter_token):
            histogram.observe(seconds)
        metrics.request_prompt_tokens.observe(512)
        metrics.request_generation_tokens.observe(256)
        metrics.request_success["stop"].inc()
    registries = [metrics.registry] + ([vllm_registry(metrics.registry)] if args.vllm_metric_names else [])
    stream = SnapshotStream(layers, experts, args.start_count, args.tokens_per_publish, random.Random(args.seed))
    snapshots = [stream.next() for _ in range(args.publishes_per_scrape * (args.repeats + 1))]  # made untimed

    def publish(snapshot: MoeStatsSnapshot, step: int) -> None:  # engine_client._publish with a due MoE snapshot
        metrics.update_engine_stats(EngineStats(64, 3, 0.5, 0, 1000 * step, 600 * step))
        metrics.update_moe(snapshot)

    publishes, fresh, cached = [], [], []
    size = 0
    for step, snapshot in enumerate(snapshots):
        publishes.append(timed(lambda: publish(snapshot, step)))
        if (step + 1) % args.publishes_per_scrape == 0:
            if step + 1 == args.publishes_per_scrape:  # warm-up scrape, untimed
                scrape_text(*registries)
                continue
            fresh.append(timed(lambda: scrape_text(*registries)))
            cached.append(timed(lambda: scrape_text(*registries)))
            size = len(scrape_text(*registries))

    print(f"service: {service.__file__}   layout {args.layout}: {layers} x {experts} = {layers * experts} "
          f"per-expert series, {size / 1e3:.0f} kB of text, start count {args.start_count}"
          + (", with vllm:* names" if args.vllm_metric_names else ""))
    print(f"publish (engine thread)   {quantiles_ms(publishes)}")
    print(f"scrape, new snapshot      {quantiles_ms(fresh)}")
    print(f"scrape, cached            {quantiles_ms(cached)}")
    return {"series": layers * experts, "text_bytes": size, "publish_s": publishes, "scrape_new_snapshot_s": fresh,
            "scrape_cached_s": cached}


if __name__ == "__main__":
    main()
