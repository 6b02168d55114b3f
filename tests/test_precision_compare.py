"""bench_engine's FP8-against-bf16 table: ratios from a hand-made report (so the numbers below are worked out here,
not read from the code)."""

import pytest

from benchmarks.precision_compare import precision_lines, precision_table


def run(tok_s: dict, step_ms: dict, gib: float, kv: int) -> dict:
    return {"throughput": {b: {"tok_s": t} for b, t in tok_s.items()},
            "decode": {b: {"step_ms": s} for b, s in step_ms.items()}, "weight_gib": gib, "kv_capacity_tokens": kv}


def test_fp8_rows_against_bf16_and_hf():
    report = {"presets": {
        "gpt-oss-20b": {"ours": run({1: 200.0, 64: 1000.0}, {1: 4.0}, 39.0, 60000),
                        "hf": {1: {"tok_s": 40.0}, 64: {"error": "out of memory"}}},
        "gpt-oss-20b+fp8": {"ours": run({1: 500.0, 64: 1500.0}, {1: 2.0}, 21.0, 120000), "hf": {}},
        "olmoe-1b-7b": {"ours": run({1: 400.0}, {1: 1.5}, 13.0, 1000), "hf": {}},  # bf16 only: no row
    }}
    table = "\n".join(precision_table(report))
    assert "| gpt-oss-20b | b1 2.50×, b64 1.50× | b1 2.00× | b1 12.5× | 39.0 → 21.0 | 60000 → 120000 |" in table
    assert "olmoe" not in table


def test_no_fp8_run_no_table():
    assert precision_table({"presets": {"olmoe-1b-7b": {"ours": run({1: 1.0}, {}, 1.0, 1), "hf": {}}}}) == []


def serve_result(tok_s: float, ttft_p50: float, kv: int, rate=None) -> dict:
    return {"serve": {"levels": [{"max_concurrency": 64, "request_rate": rate, "output_throughput": tok_s,
                                  "ttft_ms": {"p50": ttft_p50}, "failed": 0}]},
            "offline": {"kv_capacity_tokens": kv}}


def test_serving_line_says_the_offered_rate_of_an_open_loop():
    closed = precision_lines({"q": serve_result(2000.0, 300.0, 10), "q_fp8": serve_result(3000.0, 200.0, 30)}, 64)
    assert closed == ["FP8 vs bf16 q at c=64: output tok/s 3000 / 2000 = 1.50x, TTFT p50 200 / 300 ms, failed 0 / 0, "
                      "KV tokens 30 / 10"]
    opened = precision_lines({"q": serve_result(2000.0, 300.0, 10, 8.0),
                              "q_fp8": serve_result(2100.0, 250.0, 30, 8.0)}, 64)
    assert opened[0].startswith("FP8 vs bf16 q at c=64, 8.0 req/s offered: output tok/s 2100 / 2000 = 1.05x")


def test_bench_serve_request_rate_flag():
    from benchmarks.bench_serve import parse_args

    assert parse_args([]).request_rate == float("inf")
    assert parse_args(["--request-rate", "9.5"]).request_rate == 9.5
    with pytest.raises(SystemExit):
        parse_args(["--request-rate", "0"])
