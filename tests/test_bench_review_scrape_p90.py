"""benchmarks/bench_metrics_scrape.quantiles_ms: its p90 is the linear-interpolation percentile (numpy's default,
as the load generator's), not the next order statistic up."""

import re

from benchmarks.bench_metrics_scrape import quantiles_ms


def p90_of(text: str) -> float:
    return float(re.search(r"p90\s+([\d.]+) ms", text).group(1))


def test_p90_of_one_to_ten_ms_is_9_1():
    # ranks 0..9, q = 0.9: rank 8.1 -> 9 + 0.1·(10 − 9) = 9.1 ms (nearest-rank-up read 10, the maximum)
    assert p90_of(quantiles_ms([i / 1e3 for i in range(1, 11)])) == 9.1


def test_p90_of_thirty_samples_by_hand():
    # 30 samples 1..30 ms: rank 0.9·29 = 26.1 -> 27.1 ms (index int(0.9·30) = 27 read 28)
    assert p90_of(quantiles_ms([i / 1e3 for i in range(30, 0, -1)])) == 27.1
