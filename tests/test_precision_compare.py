"""bench_engine's FP8-against-bf16 table: ratios from a hand-made report (so the numbers below are worked out here,
not read from the code)."""

from benchmarks.precision_compare import precision_table


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
