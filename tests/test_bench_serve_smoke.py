"""CPU smoke run of benchmarks/bench_serve.py (tiny model): every phase runs for real — two loopback servers (metrics
on and --no-expert-metrics), the load generator, /metrics scraping, the offline engine, the utilization truth and
the HF transformers baseline — and the report carries what it must. The numbers themselves mean nothing on a CPU.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.moe_cases import moe_flops_per_token
from model.families import config_from_hf
from model.presets import PRESETS
from tests.service_fixtures import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INPUT_LEN, OUTPUT_LEN, LEVELS, HF_BATCH, TRUTH_BATCH = 8, 4, (1, 2), 2, 2


def test_moe_flops_per_token_of_olmoe_by_hand():
    config = config_from_hf(PRESETS["olmoe-1b-7b"], name="olmoe-1b-7b")
    # k=8, H=2048, I=1024: gate+up 2·8·2048·2048, down 2·8·1024·2048
    assert moe_flops_per_token(config) == 67_108_864 + 33_554_432


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_serve")
    command = [sys.executable, "benchmarks/bench_serve.py", "--presets", "tiny", "--device", "cpu",
               "--concurrency", ",".join(map(str, LEVELS)), "--metrics-concurrency", str(TRUTH_BATCH),
               "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--hf-batches", str(HF_BATCH),
               "--truth-output-len", "36", "--level-time-limit-s", "20", "--min-prompts", "4",
               "--scrape-interval-s", "0.5", "--overhead-repeats", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "STATICMOE_COMMIT": "smoke"})
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]  # 1: CPU misses targets
    [json_path] = out.glob("bench_serve_*_tiny.json")
    return out, json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_report_header_and_serving_levels(smoke_run):
    _, report, _ = smoke_run
    env, r = report["env"], report["result"]
    assert "error" not in r, r.get("error")
    assert env["device"] == "cpu" and env["date"] and env["commit"]
    levels = r["serve"]["levels"]
    assert [s["max_concurrency"] for s in levels] == list(LEVELS)
    for s in levels:
        sent = max(2 * s["max_concurrency"], 4)
        assert (s["completed"], s["failed"]) == (sent, 0)
        assert s["total_output_tokens"] == sent * OUTPUT_LEN and s["output_len_mismatches"] == 0
        assert s["total_input_tokens"] == sent * INPUT_LEN
        assert s["server_metrics"]["generation_tokens"] == s["total_output_tokens"]  # the server counted the same
        assert s["server_metrics"]["scrapes"] >= 2
    oh = r["overhead"]
    assert [run["metrics"] for run in oh["runs"]] == [True, False], "one pair, metrics on first"
    for run in oh["runs"]:
        [lv] = run["levels"]
        assert lv["max_concurrency"] == TRUTH_BATCH and lv["failed"] == 0
        if not run["metrics"]:
            assert lv["server_metrics"]["moe_timed_steps"] == 0  # no MoE timing with --no-expert-metrics
    offs = [run["levels"][0]["output_throughput"] for run in oh["runs"] if not run["metrics"]]
    assert oh["off_tok_s"] == offs[0] and abs(oh["overhead"] - (1 - oh["on_tok_s"] / oh["off_tok_s"])) < 1e-12


def test_offline_engine_truth_and_hf_baseline(smoke_run):
    _, report, _ = smoke_run
    off = report["result"]["offline"]
    assert off["offline_batch1"]["decode_step_ms"] > 0
    truth = off["utilization_truth"]
    assert "error" not in truth, truth.get("error")
    assert truth["batch"] == TRUTH_BATCH and truth["gauge_steps"] >= 1 and truth["engine_flops_match"]
    config = config_from_hf(PRESETS["tiny"], name="tiny")
    assert truth["flops_per_step"] == TRUTH_BATCH * config.num_layers * moe_flops_per_token(config)
    # the service's gauge code agrees with its definition on these steps: FLOPs / seconds / peak
    gauge = truth["gauge"]
    assert gauge["utilization"] == pytest.approx(
        truth["flops_per_step"] / gauge["seconds_per_step_mean"] / truth["peak_flops"], rel=1e-9)
    assert {"fused_moe_timer", "block_timer"} <= set(truth["independent"])
    hf = off["hf"][str(HF_BATCH)]
    assert hf["output_tokens"] == HF_BATCH * OUTPUT_LEN and hf["tok_s"] > 0


def test_markdown_targets_and_plots(smoke_run):
    out, report, md = smoke_run
    assert "no HTTP layer" in md and "no HTTP layer" in report["baseline_note"]
    for heading in ("## Server (metrics on)", "## Metrics overhead: fresh servers", "## Baseline: HF transformers",
                    "## Utilization metric truth", "## Targets"):
        assert heading in md
    names = [t["target"] for t in report["result"]["targets"]]
    assert len(names) == 5 and any("zero failed" in n for n in names) and any("TPOT" in n for n in names)
    for suffix in ("_throughput.png", "_latency.png"):
        [png] = out.glob(f"bench_serve_*_tiny{suffix}")
        assert png.read_bytes().startswith(PNG_MAGIC)


def test_replot_redraws_markdown_and_plots_from_the_json(smoke_run, tmp_path):
    from benchmarks import bench_serve

    out, report, md = smoke_run
    [json_path] = out.glob("bench_serve_*_tiny.json")
    copy = tmp_path / json_path.name
    copy.write_text(json_path.read_text())
    assert bench_serve.main(["--replot", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == md  # same report from the stored numbers
    for suffix in ("_throughput.png", "_latency.png"):
        assert (tmp_path / (copy.stem + suffix)).read_bytes().startswith(PNG_MAGIC)


def test_metrics_overhead_per_pair_of_servers():
    from benchmarks.bench_serve import pair_overheads

    def run(metrics, tok_s):
        return dict(metrics=metrics, levels=[dict(output_throughput=tok_s)])

    # the H100 ABBA of 2026-12-07 (gpu_runs.md): on 6824 / off 7423, off 7733 / on 7583, on 7627 / off 7600
    got = pair_overheads([run(True, 6824.4), run(False, 7423.2), run(False, 7732.6), run(True, 7582.5),
                          run(True, 7626.7), run(False, 7600.0)])
    assert [round(100 * x, 1) for x in got] == [8.1, 1.9, -0.4]  # 1 - on/off, by hand: 0.0807, 0.0194, -0.0035


def test_hf_speedup_target_only_for_a_closed_loop():
    """An open-loop level's tok/s is the offered rate × output length: no speedup verdict is drawn from it."""
    from benchmarks.bench_serve import parse_args, targets

    def result(rate):
        level = dict(max_concurrency=64, request_rate=rate, output_throughput=3000.0, failed=0, num_requests_sent=8)
        return {"serve": {"levels": [level]}, "offline": {"hf": {64: {"tok_s": 100.0}}}}

    args = parse_args([])
    closed = [t["target"] for t in targets(result(None), args)]
    opened = [t["target"] for t in targets(result(9.0), args)]
    assert any("HF" in t for t in closed) and not any("HF" in t for t in opened)
    assert "zero failed requests" in closed and "zero failed requests" in opened
