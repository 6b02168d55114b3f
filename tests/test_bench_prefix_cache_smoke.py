"""CPU smoke run of benchmarks/bench_prefix_cache.py (tiny model, --quick): two loopback servers (caching on, then
--no-prefix-caching) each run the no-reuse level and the multi-turn conversations, and the report carries what
the GPU run is judged by. The CPU numbers themselves mean nothing."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.bench_prefix_cache import QUICK
from tests.service_fixtures import REPO_ROOT


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_prefix_cache")
    result = subprocess.run([sys.executable, "benchmarks/bench_prefix_cache.py", "--presets", "tiny", "--device",
                             "cpu", "--quick", "--scrape-interval-s", "0.5", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "STATICMOE_COMMIT": "smoke"})
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]  # 1: CPU misses targets
    [path] = out.glob("bench_prefix_cache_*_tiny.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_both_settings_ran_both_workloads(report):
    data, _ = report
    r = data["result"]
    assert "error" not in r, r.get("error")
    assert r["order"] == ["on", "off"] and [run["caching"] for run in r["runs"]] == [True, False]
    conversations, turns = QUICK["conversations"], QUICK["turns"]
    for run in r["runs"]:
        assert ("--no-prefix-caching" in run["command"]) == (not run["caching"])
        nr, mt = run["no_reuse"], run["multi_turn"]
        assert (nr["completed"], nr["failed"]) == (QUICK["prompts_per_level"], 0)
        assert (mt["completed"], mt["failed"]) == (conversations * turns, 0)
        assert [t["completed"] for t in mt["turns"]] == [conversations] * turns
        assert len(mt["ttft_s_turn2plus"]) == conversations * (turns - 1)
        queries = mt["server_metrics"]["prefix_cache_queries"]
        assert queries == (sum(t["mean_prompt_len"] for t in mt["turns"]) * conversations if run["caching"] else 0)
    on = r["runs"][0]["multi_turn"]["server_metrics"]
    assert on["prefix_cache_hits"] >= conversations * sum(
        (QUICK["system_prompt_len"] + t * (QUICK["user_len"] + QUICK["turn_output_len"]) + QUICK["user_len"])
        // 16 * 16 for t in range(turns - 1)), "turns >= 2 find the previous turn's prompt"
    assert r["runs"][0]["no_reuse"]["server_metrics"]["prefix_cache_hits"] == 0, "random prompts share nothing"


def test_comparison_targets_and_markdown(report):
    data, md = report
    cmp, targets = data["result"]["compare"], data["result"]["targets"]
    assert set(cmp) == {"on", "off"} and cmp["on"]["hit_rate"] > 0.5 and cmp["off"]["hit_rate"] == 0
    names = [t["target"] for t in targets]
    assert len(names) == 3 and "TTFT p50 over turns >= 2" in names[0] and "98%" in names[1]
    assert targets[2]["passed"], "zero failed requests"
    for text in ("# Prefix-caching benchmark — tiny, cpu", "## Server 1: caching on", "## Server 2: caching off",
                 "## Targets", "| turn | completed |"):
        assert text in md


@pytest.mark.parametrize("argv, message", [(["--client-processes", "0"], "must be >= 1"),
                                           (["--start-spread-s", "-1"], "must be >= 0")])
def test_bad_load_arguments_are_refused_before_any_server_starts(argv, message, capsys):
    from benchmarks import bench_prefix_cache

    with pytest.raises(SystemExit):
        bench_prefix_cache.parse_args([*argv, "--out", "/nonexistent"])
    assert message in capsys.readouterr().err
