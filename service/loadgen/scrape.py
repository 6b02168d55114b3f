"""Scrapes a staticmoe server's /metrics while a load level runs, and reduces the samples to a few numbers.

Counters are read as increases over the level (last scrape - first scrape, a scrape is taken at the start and at
the end); gauges as their samples. `staticmoe_moe_tensor_core_utilization` is kept sample by sample: it reports the
sampled steps since the previous publication, so its spread over a level is part of the record.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("staticmoe_moe_tensor_core_utilization", "staticmoe_num_requests_running",
          "staticmoe_num_requests_waiting", "staticmoe_kv_cache_usage_perc")
COUNTERS = ("staticmoe_generation_tokens_total", "staticmoe_prompt_tokens_total", "staticmoe_num_preemptions_total",
            "staticmoe_moe_flops_total", "staticmoe_moe_kernel_seconds_sum", "staticmoe_moe_kernel_seconds_count",
            "staticmoe_prefix_cache_queries_total", "staticmoe_prefix_cache_hits_total",
            # the server's own request timing (histogram sums and counts): with the client's TTFT, they tell server
            # latency from the load generator's own (one Python process parsing every stream)
            "staticmoe_time_to_first_token_seconds_sum", "staticmoe_time_to_first_token_seconds_count",
            "staticmoe_request_queue_time_seconds_sum", "staticmoe_request_queue_time_seconds_count")


def read_samples(text: str) -> dict[str, float]:
    """{sample name: value summed over label sets} for the names above."""
    wanted = set(GAUGES) | set(COUNTERS)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


class MetricsScraper:
    """`async with MetricsScraper(url, interval):` scrapes at entry, every `interval_s`, and at exit."""

    def __init__(self, base_url: str, interval_s: float = 2.0, api_key: str | None = None):
        self.url = base_url.rstrip("/") + "/metrics"
        self.interval_s = interval_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None

    async def _scrape(self) -> None:
        try:
            response = await self._client.get(self.url, headers=self.headers)
            response.raise_for_status()
            self.samples.append((time.perf_counter(), read_samples(response.text)))
        except (httpx.HTTPError, ValueError) as err:
            self.errors.append(f"{type(err).__name__}: {err}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._scrape()

    async def __aenter__(self) -> "MetricsScraper":
        self._client = httpx.AsyncClient(timeout=10.0)
        await self._scrape()
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await self._scrape()
        await self._client.aclose()

    def summary(self) -> dict:
        if len(self.samples) < 2:
            return {"scrapes": len(self.samples), "errors": self.errors[:5]}
        first, last = self.samples[0][1], self.samples[-1][1]
        increase = {name: last.get(name, 0.0) - first.get(name, 0.0) for name in COUNTERS}
        kernel_steps = increase["staticmoe_moe_kernel_seconds_count"]
        during = [s for _, s in self.samples[1:-1]] or [last]
        util = [s.get("staticmoe_moe_tensor_core_utilization", 0.0) for _, s in self.samples[1:]]
        util = [u for u in util if u > 0]
        return {
            "scrapes": len(self.samples),
            "errors": self.errors[:5],
            "generation_tokens": increase["staticmoe_generation_tokens_total"],
            "prompt_tokens": increase["staticmoe_prompt_tokens_total"],
            "preemptions": increase["staticmoe_num_preemptions_total"],
            "prefix_cache_queries": increase["staticmoe_prefix_cache_queries_total"],
            "prefix_cache_hits": increase["staticmoe_prefix_cache_hits_total"],
            "moe_flops": increase["staticmoe_moe_flops_total"],
            "server_ttft_mean_s": _mean_of(increase, "staticmoe_time_to_first_token_seconds"),
            "server_queue_time_mean_s": _mean_of(increase, "staticmoe_request_queue_time_seconds"),
            "moe_timed_steps": kernel_steps,
            "moe_kernel_seconds_mean": (increase["staticmoe_moe_kernel_seconds_sum"] / kernel_steps
                                        if kernel_steps else None),
            "tensor_core_utilization_samples": util,
            "tensor_core_utilization_median": statistics.median(util) if util else None,
            "running_max": max(s.get("staticmoe_num_requests_running", 0.0) for s in during),
            "waiting_max": max(s.get("staticmoe_num_requests_waiting", 0.0) for s in during),
            "kv_cache_usage_max": max(s.get("staticmoe_kv_cache_usage_perc", 0.0) for s in during),
        }


def _mean_of(increase: dict[str, float], histogram: str) -> float | None:
    count = increase[histogram + "_count"]
    return increase[histogram + "_sum"] / count if count else None
