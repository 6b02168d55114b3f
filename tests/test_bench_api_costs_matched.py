"""benchmarks/bench_api_costs.py's matched_lengths control: plain requests as long as the structured_json ones of the
same run, so that the grammar's own cost is told apart from the cost of its outputs' varied lengths."""

import pytest

from benchmarks import bench_api_costs
from service.loadgen.dataset import PromptSpec


def test_matched_lengths_replays_the_json_lengths_in_order_on_the_same_prompts():
    specs = [PromptSpec([i, i + 1], 2, 256) for i in range(5)]
    got = bench_api_costs.matched_length_specs(specs, [30, 7, 51])
    assert [s.output_len for s in got] == [30, 7, 51, 30, 7]
    assert [s.prompt for s in got] == [s.prompt for s in specs]
    assert all(s.prompt_len == 2 for s in got)


def test_matched_lengths_needs_json_lengths_and_sends_plain_requests():
    with pytest.raises(RuntimeError, match="structured_json"):
        bench_api_costs.matched_length_specs([PromptSpec([1], 1, 8)], [])
    assert bench_api_costs.features(256)["matched_lengths"] == {}  # no constraint, max_tokens from the spec
    with pytest.raises(SystemExit, match="structured_json"):
        bench_api_costs.main(["--features", "matched_lengths", "--out", "/nonexistent"])
