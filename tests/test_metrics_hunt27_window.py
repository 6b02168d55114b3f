"""Metrics hunt 27: the recent window of the per-expert gauges (staticmoe_expert_load_imbalance / _idle) covers every
harvest interval since the counters were reset until it holds `window_harvests` of them. It dropped the first
interval (zero -> first harvest) as soon as a second harvest came: a fresh server's idle gauge counted experts idle
that had served the first requests."""

import torch

from model.engine.moe_stats import MoeStatsCollector
from tests.reference_model import tiny_reference_model


def collector(window_harvests=32):
    model = tiny_reference_model()
    blocks = model.moe_blocks()
    stats = MoeStatsCollector(blocks, torch.device("cpu"), enabled=True, timing_every=16,
                              window_harvests=window_harvests)
    stats.reset_counts()  # as the engine does at start-up
    return stats, blocks


def route(blocks, expert, tokens):
    for b in blocks:
        b.experts.expert_load[expert] += tokens


def test_the_window_holds_all_tokens_since_reset_until_it_is_full():
    stats, blocks = collector()
    route(blocks, 0, 5)
    stats.after_read_back(going_idle=True)  # harvest 1 (the engine went idle)
    route(blocks, 1, 3)
    stats.after_read_back(going_idle=True)  # harvest 2
    snap = stats.snapshot()
    experts = blocks[0].num_experts
    assert snap.expert_tokens_total[0] == [5, 3] + [0] * (experts - 2)
    # two harvest intervals, fewer than the 32 the window holds: it is everything since the reset
    assert snap.window_expert_tokens[0] == snap.expert_tokens_total[0]


def test_a_full_window_holds_the_last_window_harvests_intervals():
    stats, blocks = collector(window_harvests=2)
    for expert in range(4):  # one harvest per expert: 4 intervals, the window keeps the last 2
        route(blocks, expert, 1 + expert)
        stats.after_read_back(going_idle=True)
    snap = stats.snapshot()
    experts = blocks[0].num_experts
    assert snap.expert_tokens_total[0] == [1, 2, 3, 4] + [0] * (experts - 4)
    assert snap.window_expert_tokens[0] == [0, 0, 3, 4] + [0] * (experts - 4)


def test_no_harvest_yet_is_an_empty_window():
    stats, blocks = collector()
    snap = stats.snapshot()
    assert snap.window_expert_tokens == [[0] * b.num_experts for b in blocks]
    assert snap.expert_tokens_total == snap.window_expert_tokens
