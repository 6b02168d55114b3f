"""Per-expert load for Prometheus, built at scrape time from the latest MoE snapshot.

One labelled Counter child per (layer, expert) is what prometheus-client offers, but at Qwen3-30B-A3B's 48 × 128
experts that is 6144 children, and folding a snapshot in (one locked `inc` each) took ~8-11 ms of the engine thread
per publish (4 per second; benchmarks/NOTES.md "Metrics on the host"). Here the engine thread only hands over the
snapshot's lists (`update`, O(1)); a scrape (every few seconds, on the event loop) builds the families from them.

Counters must never decrease: the engine's totals subtract the CUDA-graph pad token's measured routing and are
clamped at zero, so each exported value is the running maximum of what has been seen.
"""

from __future__ import annotations

import threading

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TOKENS_HELP = "Tokens routed to each expert (one per top-k slot)."
IMBALANCE_HELP = "Max / mean tokens per expert over the recent window (1 = balanced, 0 = no tokens)."
IDLE_HELP = "Experts that received no token in the recent window."


def window_balance(tokens_per_expert: list[int]) -> tuple[float, int]:
    """(max / mean, experts with zero tokens) of one layer's window; imbalance is 0 for an empty window."""
    total = sum(tokens_per_expert)
    idle = sum(1 for t in tokens_per_expert if t == 0)
    if total == 0:
        return 0.0, idle
    return max(tokens_per_expert) / (total / len(tokens_per_expert)), idle


class ExpertLoadCollector:
    """staticmoe_expert_tokens_total{layer, expert} (if `counters`) and staticmoe_expert_load_imbalance /
    staticmoe_expert_idle{layer} (if `window`), registered on a CollectorRegistry."""

    def __init__(self, layer_labels: list[str], experts_per_layer: list[int], counters: bool, window: bool):
        self.layer_labels, self.experts_per_layer = layer_labels, experts_per_layer
        self.counters, self.window = counters, window
        self._totals: list[list[int]] | None = None  # the last snapshot's cumulative counts
        self._window = [[0] * experts for experts in experts_per_layer]  # ... and its recent window
        self._exported = [[0] * experts for experts in experts_per_layer]  # running max of the totals
        self._lock = threading.Lock()  # two scrapes at once must not interleave their running-max updates

    def update(self, totals: list[list[int]], window: list[list[int]]) -> None:
        """Called by the engine thread with a snapshot's lists (not copied: the snapshot is not reused); an empty
        list leaves the previous values."""
        if totals:
            self._totals = totals
        if window:
            self._window = window

    def describe(self):  # the registry asks at registration: the names, without a collect
        families = []
        if self.counters:
            families.append(CounterMetricFamily("staticmoe_expert_tokens", TOKENS_HELP, labels=["layer", "expert"]))
        if self.window:
            families += [GaugeMetricFamily("staticmoe_expert_load_imbalance", IMBALANCE_HELP, labels=["layer"]),
                         GaugeMetricFamily("staticmoe_expert_idle", IDLE_HELP, labels=["layer"])]
        return families

    def collect(self):
        if self.counters:
            tokens = CounterMetricFamily("staticmoe_expert_tokens", TOKENS_HELP, labels=["layer", "expert"])
            totals = self._totals or self._exported
            with self._lock:
                for layer, exported, seen in zip(self.layer_labels, self._exported, totals):
                    for expert, value in enumerate(seen[: len(exported)]):
                        if value > exported[expert]:
                            exported[expert] = value
                        tokens.add_metric([layer, str(expert)], exported[expert])
            yield tokens
        if self.window:
            imbalance = GaugeMetricFamily("staticmoe_expert_load_imbalance", IMBALANCE_HELP, labels=["layer"])
            idle = GaugeMetricFamily("staticmoe_expert_idle", IDLE_HELP, labels=["layer"])
            for layer, row in zip(self.layer_labels, self._window):
                ratio, empty = window_balance(row)
                imbalance.add_metric([layer], ratio)
                idle.add_metric([layer], empty)
            yield imbalance
            yield idle
