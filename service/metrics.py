"""Prometheus metrics, prefix `staticmoe_`.

Request metrics mirror vLLM's names (vllm:X -> staticmoe_X), labels (`model_name`) and histogram buckets, so vLLM
dashboards and PromQL carry over by swapping the prefix. MoE metrics (tensor-core utilization, FLOPs, kernel time,
per-expert load) come from `engine.moe_stats()`, which the engine fills from device-side counters and timing events
without a sync (model/engine/moe_stats.py, moe_timer.py).
All updates happen on the engine thread; prometheus-client metrics are thread-safe for the scraping thread. The
per-expert series are rendered at scrape time from the latest snapshot and cached until the next
(service/metrics_experts.py): thousands of labelled children cost the engine thread milliseconds per publish, and
formatting them sample by sample costs every scrape ~0.1 s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from model.engine import EngineStats, MoeStatsSnapshot
from service.metrics_experts import ExpertLoadCollector, window_balance  # noqa: F401 (window_balance: re-exported)

logger = logging.getLogger("staticmoe.service")

# vLLM v1 (vllm/v1/metrics/loggers.py) buckets, copied as data so dashboards built on them line up.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
INTER_TOKEN_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]
MOE_KERNEL_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                      0.5, 1.0, 2.5]
# "error": a choice its constraints left with no valid token (RequestOutput.finish_reason "error"); without its own
# series such requests were in the e2e histogram but in no request_success series. vLLM has the label too.
FINISH_REASONS = ("stop", "length", "abort", "error")
EXPERT_SERIES_AUTO_LIMIT = 8192

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by device name; the first matching entry wins, so the more
# specific names come first ("H200" before "H20", "H100 PCIe" before "H100").
DENSE_BF16_PEAKS: list[tuple[str, float]] = [
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800 PCIE", 756e12),
    ("H800", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
]


# Dense FP8 (e4m3) tensor-core peak, twice the bf16 one: the denominator when the experts run FP8, so a dashboard
# never divides FP8 FLOP/s by the bf16 peak.
DENSE_FP8_PEAKS: list[tuple[str, float]] = [
    ("H100 PCIE", 1513e12),
    ("H100 NVL", 1671e12),
    ("H100", 1979e12),
    ("H800 PCIE", 1513e12),
    ("H800", 1979e12),
    ("H200", 1979e12),
    ("H20", 296e12),
]


def dense_bf16_peak_flops(device_name: str) -> float | None:
    return dense_peak_flops(device_name, "bfloat16")


def dense_peak_flops(device_name: str, precision: str) -> float | None:
    """The dense tensor-core peak of `device_name` for experts computing in `precision` ("fp8" or a 16-bit dtype
    name), or None for an unknown device."""
    name = device_name.upper()
    for key, peak in DENSE_FP8_PEAKS if precision == "fp8" else DENSE_BF16_PEAKS:
        if key in name:
            return peak
    return None


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return [float(b) for b in buckets] or [1.0]
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass
class MoeLayout:
    layer_labels: list[str]          # model layer index of each MoE layer (the `layer` label)
    experts_per_layer: list[int]
    device_name: str
    peak_flops: float | None        # None: unknown device, utilization stays 0
    expert_counters: bool           # export staticmoe_expert_tokens_total{layer, expert}
    expert_window_metrics: bool = True
    precision: str = "bfloat16"     # what the experts compute in ("fp8", "bfloat16", ...): picks the peak


class ServiceMetrics:
    def __init__(self, model_name: str, max_model_len: int = 32768, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r = self.registry

        def per_model(kind, name: str, documentation: str, **kwargs):
            """A metric labelled by model_name alone, as vLLM's are; its one child, for this model."""
            return kind(name, documentation, ["model_name"], registry=r, **kwargs).labels(model_name=model_name)

        self.num_running = per_model(Gauge, "staticmoe_num_requests_running",
                                     "Number of requests in model execution batches.")
        self.num_waiting = per_model(Gauge, "staticmoe_num_requests_waiting",
                                     "Number of requests waiting to be processed.")
        self.kv_cache_usage = per_model(Gauge, "staticmoe_kv_cache_usage_perc",
                                        "KV-cache usage. 1 means 100 percent usage.")
        self.num_preemptions = per_model(Counter, "staticmoe_num_preemptions",
                                         "Cumulative number of preemption from the engine.")
        self.prefix_cache_queries = per_model(Counter, "staticmoe_prefix_cache_queries",
                                              "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = per_model(Counter, "staticmoe_prefix_cache_hits",
                                           "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens = per_model(Counter, "staticmoe_prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = per_model(Counter, "staticmoe_generation_tokens",
                                           "Number of generation tokens processed.")
        success = Counter("staticmoe_request_success", "Count of successfully processed requests.",
                          ["model_name", "finished_reason"], registry=r)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = per_model(Histogram, "staticmoe_request_prompt_tokens",
                                               "Number of prefill tokens processed.", buckets=token_buckets)
        self.request_generation_tokens = per_model(Histogram, "staticmoe_request_generation_tokens",
                                                   "Number of generation tokens processed.", buckets=token_buckets)
        self.ttft = per_model(Histogram, "staticmoe_time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", buckets=TTFT_BUCKETS)
        self.inter_token = per_model(Histogram, "staticmoe_inter_token_latency_seconds",
                                     "Histogram of inter-token latency in seconds.", buckets=INTER_TOKEN_BUCKETS)
        self.e2e = per_model(Histogram, "staticmoe_e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", buckets=REQUEST_LATENCY_BUCKETS)
        self.queue_time = per_model(Histogram, "staticmoe_request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.",
                                    buckets=REQUEST_LATENCY_BUCKETS)
        self.rejected = Counter("staticmoe_requests_rejected", "Requests refused before reaching the engine.",
                                ["reason"], registry=r)
        # the series exists at 0 from the start (as request_success's): rate()/increase() need a sample before the
        # first 429, else an alert misses the first burst of refusals
        self.rejected.labels("queue_full")

        self.tensor_core_utilization = Gauge(
            "staticmoe_moe_tensor_core_utilization",
            "Achieved routed-expert GEMM FLOP/s of fused_moe over the device's dense peak in the experts' precision "
            "(bf16, or FP8 when they run FP8; see staticmoe_moe_precision_info) (0-1): FLOPs of the tokens it computed "
            "(CUDA-graph padding rows route to no expert) / its time inside the sampled steps.", registry=r)
        self.peak_flops = Gauge("staticmoe_moe_peak_flops",
                                "Dense peak FLOP/s (bf16 or FP8, as the experts run) used as the utilization "
                                "denominator (0 = unknown).", registry=r)
        self.precision_info = Gauge("staticmoe_moe_precision_info",
                                    "1 for the precision the routed experts compute in (fp8, bfloat16, ...).",
                                    ["precision"], registry=r)
        self.moe_flops = Counter("staticmoe_moe_flops", "Routed-expert GEMM FLOPs of the tokens served (analytic "
                                 "count; CUDA-graph padding rows not included).", registry=r)
        self.shared_expert_flops = Counter("staticmoe_moe_shared_expert_flops",
                                           "Dense shared-expert GEMM FLOPs executed (models with shared experts).",
                                           registry=r)
        self.moe_kernel_seconds = Histogram("staticmoe_moe_kernel_seconds",
                                            "fused_moe time of one sampled engine step (all MoE layers), seconds.",
                                            buckets=MOE_KERNEL_BUCKETS, registry=r)
        self._moe: MoeLayout | None = None
        self._experts: ExpertLoadCollector | None = None  # per-expert series, built at scrape time
        self._moe_state = _MoeCumulative()

    # ---- engine-level gauges -------------------------------------------------------------------------------------
    def update_engine_stats(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        state = self._moe_state
        for counter, name, total in (
                (self.num_preemptions, "num_preemptions_total", stats.num_preemptions_total),
                (self.prefix_cache_queries, "prefix_cache_queries_total", stats.prefix_cache_queries_total),
                (self.prefix_cache_hits, "prefix_cache_hits_total", stats.prefix_cache_hits_total)):
            seen = state.engine_totals.get(name, 0)
            if total > seen:  # the engine's totals only grow: export the increment
                counter.inc(total - seen)
                state.engine_totals[name] = total

    # ---- MoE -------------------------------------------------------------------------------------------------------
    def configure_moe(self, layout: MoeLayout) -> None:
        self._moe = layout
        self.peak_flops.set(layout.peak_flops or 0.0)
        self.precision_info.labels(layout.precision).set(1)
        if layout.peak_flops is None:
            logger.info("no dense %s peak known for device %r: staticmoe_moe_tensor_core_utilization stays 0 "
                        "(set --moe-peak-flops to override)", layout.precision, layout.device_name)
        if layout.expert_counters or layout.expert_window_metrics:
            self._experts = ExpertLoadCollector(layout.layer_labels, layout.experts_per_layer,
                                                layout.expert_counters, layout.expert_window_metrics)
            self.registry.register(self._experts)

    def update_moe(self, snap: MoeStatsSnapshot) -> None:
        """Fold one MoeStatsSnapshot in: counters get the increase since the previous snapshot."""
        layout, state = self._moe, self._moe_state
        if snap.flops_total > state.flops_total:
            self.moe_flops.inc(snap.flops_total - state.flops_total)
            state.flops_total = snap.flops_total
        shared = snap.shared_expert_flops_total
        if shared > state.shared_flops_total:
            self.shared_expert_flops.inc(shared - state.shared_flops_total)
            state.shared_flops_total = shared
        if snap.timed:
            seconds = sum(s for s, _ in snap.timed)
            flops = sum(f for _, f in snap.timed)
            for s, _ in snap.timed:
                self.moe_kernel_seconds.observe(s)
            if layout is not None and layout.peak_flops and seconds > 0:
                self.tensor_core_utilization.set(min(1.0, flops / seconds / layout.peak_flops))
        if layout is None:
            return
        if self._experts is not None:
            self._experts.update(snap.expert_tokens_total, snap.window_expert_tokens)


@dataclass
class _MoeCumulative:
    flops_total: float = 0.0
    shared_flops_total: float = 0.0
    engine_totals: dict[str, int] = field(default_factory=dict)  # EngineStats counters already exported
