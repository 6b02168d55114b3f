"""Per-expert load for Prometheus, rendered at scrape time from the latest MoE snapshot and cached until the next.

One labelled Counter child per (layer, expert) is what prometheus-client offers, but at Qwen3-30B-A3B's 48 × 128
experts that is 6144 children, and folding a snapshot in (one locked `inc` each) took ~8-11 ms of the engine thread
per publish (4 per second; benchmarks/NOTES.md "Metrics on the host"). Here the engine thread only hands over the
snapshot's lists (`update`, O(1), no lock). A scrape renders the families' text from them through the fast path of
service/metrics_text.py (a few ms instead of ~0.1 s of formatting by `generate_latest`) and keeps it: scrapes
between two snapshots copy the cached text.

Counters must never decrease, even across an engine's `reset_counts` (start-up), so each exported value is the
running maximum of what the scrapes have seen.
"""

from __future__ import annotations

import threading

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.metrics_text import RenderedFamily, header_and_line_prefixes, render_lines

TOKENS_HELP = "Tokens routed to each expert (one per top-k slot)."
IMBALANCE_HELP = "Max / mean tokens per expert over the recent window (1 = balanced, 0 = no tokens)."
IDLE_HELP = "Experts that received no token in the recent window."


def window_balance(tokens_per_expert: list[int]) -> tuple[float, int]:
    """(max / mean, experts with zero tokens) of one layer's window; imbalance is 0 for an empty window."""
    total = sum(tokens_per_expert)
    idle = tokens_per_expert.count(0)
    if total == 0:
        return 0.0, idle
    return max(tokens_per_expert) / (total / len(tokens_per_expert)), idle


def tokens_family(layer_labels: list[str], rows: list[list[int]]) -> CounterMetricFamily:
    family = CounterMetricFamily("staticmoe_expert_tokens", TOKENS_HELP, labels=["layer", "expert"])
    for layer, row in zip(layer_labels, rows):
        for expert, value in enumerate(row):
            family.add_metric([layer, str(expert)], value)
    return family


def per_layer_family(name: str, documentation: str, layer_labels: list[str], values: list) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["layer"])
    for layer, value in zip(layer_labels, values):
        family.add_metric([layer], value)
    return family


class ExpertLoadCollector:
    """staticmoe_expert_tokens_total{layer, expert} (if `counters`) and staticmoe_expert_load_imbalance /
    staticmoe_expert_idle{layer} (if `window`), registered on a CollectorRegistry."""

    def __init__(self, layer_labels: list[str], experts_per_layer: list[int], counters: bool, window: bool):
        self.layer_labels, self.experts_per_layer = layer_labels, experts_per_layer
        self.counters, self.window = counters, window
        # (cumulative counts or None before the first, recent window) of the last snapshot, replaced as one object
        # by the engine thread: a scrape reads one consistent pair without a lock, and `is` tells a new snapshot.
        self._latest: tuple[list[list[int]] | None, list[list[int]]] = \
            (None, [[0] * experts for experts in experts_per_layer])
        self._exported = [[0] * experts for experts in experts_per_layer]  # running max of the totals
        self._rendered_from: tuple | None = None  # the `_latest` that `_rendered` shows
        self._rendered: list[RenderedFamily] = []
        self._lock = threading.Lock()  # scrapes only (two at once must not interleave running-max updates)
        zeros = [[0] * experts for experts in experts_per_layer]
        self._tokens_header, prefixes = header_and_line_prefixes(tokens_family(layer_labels, zeros))
        self._tokens_prefixes: list[list[str]] = []  # [MoE layer][expert]: 'staticmoe_expert_tokens_total{...} '
        for experts in experts_per_layer:
            self._tokens_prefixes.append(prefixes[:experts])
            prefixes = prefixes[experts:]
        self._imbalance_header, self._imbalance_prefixes = header_and_line_prefixes(per_layer_family(
            "staticmoe_expert_load_imbalance", IMBALANCE_HELP, layer_labels, [0.0] * len(layer_labels)))
        self._idle_header, self._idle_prefixes = header_and_line_prefixes(per_layer_family(
            "staticmoe_expert_idle", IDLE_HELP, layer_labels, [0] * len(layer_labels)))

    def update(self, totals: list[list[int]], window: list[list[int]]) -> None:
        """Called by the engine thread with a snapshot's lists (not copied: the snapshot is not reused); an empty
        list leaves the previous values."""
        if totals or window:  # a new pair only for new lists: the cached text stays valid otherwise
            previous_totals, previous_window = self._latest
            self._latest = (totals or previous_totals, window or previous_window)

    def describe(self):  # the registry asks at registration: the names, without a collect
        families = []
        if self.counters:
            families.append(CounterMetricFamily("staticmoe_expert_tokens", TOKENS_HELP, labels=["layer", "expert"]))
        if self.window:
            families += [GaugeMetricFamily("staticmoe_expert_load_imbalance", IMBALANCE_HELP, labels=["layer"]),
                         GaugeMetricFamily("staticmoe_expert_idle", IDLE_HELP, labels=["layer"])]
        return families

    def collect(self):
        with self._lock:  # held for one render at most; the engine thread never takes it
            latest = self._latest
            if latest is not self._rendered_from:
                self._rendered = self._render(*latest)
                self._rendered_from = latest
            return list(self._rendered)

    def _render(self, totals: list[list[int]] | None, window: list[list[int]]) -> list[RenderedFamily]:
        families = []
        if self.counters:
            rows = []  # [MoE layer][expert] exported now (a copy: `_exported` moves on with later snapshots)
            for exported, seen in zip(self._exported, totals or self._exported):
                covered = min(len(exported), len(seen))
                exported[:covered] = [s if s > e else e for s, e in zip(seen, exported)]
                rows.append(exported[:covered])
            text = [render_lines(prefixes, row) for prefixes, row in zip(self._tokens_prefixes, rows)]
            families.append(RenderedFamily(
                CounterMetricFamily("staticmoe_expert_tokens", TOKENS_HELP, labels=["layer", "expert"]),
                self._tokens_header + "".join(text).encode(),
                lambda: tokens_family(self.layer_labels, rows).samples))
        if self.window:
            balance = [window_balance(row) for _, row in zip(self.layer_labels, window)]
            ratios, idle = [ratio for ratio, _ in balance], [empty for _, empty in balance]
            for name, documentation, header, prefixes, values in (
                    ("staticmoe_expert_load_imbalance", IMBALANCE_HELP, self._imbalance_header,
                     self._imbalance_prefixes, ratios),
                    ("staticmoe_expert_idle", IDLE_HELP, self._idle_header, self._idle_prefixes, idle)):
                families.append(RenderedFamily(
                    GaugeMetricFamily(name, documentation, labels=["layer"]),
                    header + render_lines(prefixes, values).encode(),
                    lambda name=name, documentation=documentation, values=values:
                        per_layer_family(name, documentation, self.layer_labels, values).samples))
        return families
