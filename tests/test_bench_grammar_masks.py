"""benchmarks/bench_grammar_masks.py runs on the CPU with bench_api_costs' tokenizer and both of its constraints,
and what it reports is consistent (every part timed, completed requests counted with their lengths)."""

import argparse
import json

from benchmarks import bench_api_costs, bench_grammar_masks


def test_bench_grammar_masks_runs_both_constraints(tmp_path):
    args = argparse.Namespace(preset="qwen3-30b-a3b", vocab=400)
    source = bench_api_costs.model_source(args, tmp_path)
    directory = source[source.index("--model") + 1]
    out = tmp_path / "masks.json"
    assert bench_grammar_masks.main(["--tokenizer", directory, "--num-seqs", "4", "--steps", "40", "--warmup", "1",
                                     "--output-len", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    by_name = {r["constraint"]: r for r in report["results"]}
    assert set(by_name) == {"structured_json", "structured_regex"}
    for r in by_name.values():
        assert r["ms_per_step"]["fill"] > 0 and r["ms_per_step"]["advance"] > 0
        assert r["ms_per_step"]["extras"] >= r["ms_per_step"]["fill"]  # the fill is part of extras
    json_run, regex_run = by_name["structured_json"], by_name["structured_regex"]
    assert json_run["requests_completed"] > 0 and json_run["mean_output_tokens"] >= 1  # the schema completes
    # "[a-z ]{0,128}" (32 x output-len 4) completes at 128 characters only: at least 4 tokens of at most 32 bytes
    if regex_run["requests_completed"]:
        assert regex_run["mean_output_tokens"] >= 4
    assert report["device_bytes"]["all_rows_MB"] < report["device_bytes"]["before_MB"]
