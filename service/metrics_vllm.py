"""The request metrics again under vLLM's own names (`vllm:num_requests_waiting`, ...), for dashboards, KEDA/HPA
rules and routers written against vLLM (`--vllm-metric-names`). The `staticmoe_` series stay; these are copies
made at scrape time from the same registry (no second set of counters to keep in step), plus the older vLLM names
of two of them (`vllm:gpu_cache_usage_perc`, `vllm:time_per_output_token_seconds`) that many dashboards still use.
"""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry

PREFIX = "staticmoe_"
MIRRORED = {  # staticmoe_X -> vllm:X, and any older vLLM names of X
    "num_requests_running": (), "num_requests_waiting": (), "kv_cache_usage_perc": ("gpu_cache_usage_perc",),
    "num_preemptions": (), "prompt_tokens": (), "generation_tokens": (), "request_success": (),
    # vLLM's hit-rate counters (vllm:prefix_cache_queries/hits); the staticmoe_ pair was added after this list and
    # was missing under vLLM's names
    "prefix_cache_queries": (), "prefix_cache_hits": (),
    "request_prompt_tokens": (), "request_generation_tokens": (), "time_to_first_token_seconds": (),
    "inter_token_latency_seconds": ("time_per_output_token_seconds",), "e2e_request_latency_seconds": (),
    "request_queue_time_seconds": (),
}


class VllmNames:
    """A collector for a registry of its own: yields renamed copies of `source`'s request metric families."""

    def __init__(self, source: CollectorRegistry):
        self.source = source

    def describe(self):
        return []  # names are only known once the engine's metrics exist; nothing to check at registration

    def collect(self):
        for family in self.source.collect():
            base = family.name[len(PREFIX):] if family.name.startswith(PREFIX) else None
            if base not in MIRRORED:
                continue
            for name in (base, *MIRRORED[base]):
                renamed = copy.copy(family)
                renamed.name = "vllm:" + name
                renamed.samples = [s._replace(name="vllm:" + name + s.name[len(family.name):])
                                   for s in family.samples]
                yield renamed


def vllm_registry(source: CollectorRegistry) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VllmNames(source))
    return registry
