"""`staticmoe bench serve` (service/loadgen/) against a real loopback server running the tiny model on CPU.

The shared `served` server (tests/service_fixtures.py) requires API key `test-key`; its /metrics counters give an
independent count of the tokens the load generator says it received.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from service import loadgen
from service.loadgen.client import LevelRun, RequestResult
from service.loadgen.dataset import load_sharegpt, random_token_prompts
from service.loadgen.multiturn import make_conversations
from service.loadgen.report import distribution_ms, percentile, summarize
from tests.service_fixtures import API_KEY, REPO_ROOT, free_port, metric, parse_metrics, served  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVEL_KEYS = {"max_concurrency", "request_rate", "num_requests_sent", "completed", "failed", "not_sent", "errors",
              "output_len_mismatches", "prompt_len_mismatches", "duration_s", "total_input_tokens",
              "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
              "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "slots_busy", "timeline"}


def run_cli(tmp_path, base_url, *extra, name="run"):
    rc = loadgen.main(["--base-url", base_url, "--model", "tiny", "--result-dir", str(tmp_path),
                       "--result-name", name, *extra])
    return rc, json.loads((tmp_path / f"{name}.json").read_text())


# ---- numbers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [[3.0], [5.0, 1.0], [0.5, 9.0, 2.0, 2.0, 7.5], list(np.random.default_rng(0).
                                                                                     exponential(3.0, 101))])
def test_percentile_matches_numpy(data):
    for q in (0, 1, 25, 33.3, 50, 90, 99, 100):
        assert percentile(list(data), q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12, abs=1e-12)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_distribution_in_milliseconds():
    d = distribution_ms([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert d["mean"] == pytest.approx(50.5)
    assert d["p50"] == pytest.approx(50.5)
    assert d["p90"] == pytest.approx(90.1)
    assert d["p99"] == pytest.approx(99.01)
    assert distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_summary_of_known_requests():
    # request A: ttft 0.1 s, e2e 1.1 s, 11 tokens -> TPOT 0.1 s; request B: ttft 0.3, e2e 0.5, 5 tokens -> 0.05 s
    a = RequestResult(True, 10, 10, 11, output_tokens=11, ttft_s=0.1, latency_s=1.1, itl_s=[0.2, 0.4], sent_at=100.5)
    b = RequestResult(True, 20, 20, 5, output_tokens=5, ttft_s=0.3, latency_s=0.5, itl_s=[0.1], sent_at=100.0)
    one_token = RequestResult(True, 5, 5, 1, output_tokens=1, ttft_s=0.2, latency_s=0.2, sent_at=101.25)
    bad = RequestResult(False, 7, 7, 4, error="HTTP 401: nope", sent_at=99.75)  # the level's first request
    s = summarize(LevelRun(4, math.inf, [a, b, one_token, bad], not_sent=2, duration_s=2.0))
    assert set(s) == LEVEL_KEYS
    assert (s["completed"], s["failed"], s["not_sent"], s["num_requests_sent"]) == (3, 1, 2, 4)
    assert s["errors"] == {"HTTP 401: nope": 1}
    assert s["total_input_tokens"] == 35 and s["total_output_tokens"] == 17
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.5)
    assert s["total_token_throughput"] == pytest.approx(26.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(75.0)  # one-token requests have no TPOT
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["mean"] == pytest.approx(700.0 / 3)  # pooled gaps
    assert s["e2el_ms"]["p50"] == pytest.approx(500.0)
    assert s["request_rate"] is None
    assert s["output_len_mismatches"] == 0
    assert s["slots_busy"] == pytest.approx((1.1 + 0.5 + 0.2) / (2.0 * 4))  # request-seconds / (wall x c)
    assert summarize(LevelRun(None, 2.0, [a], not_sent=0, duration_s=2.0))["slots_busy"] is None  # open loop
    # completed requests by send time, counted from the first sent (bad, which is left out): b, a, one_token
    assert s["timeline"] == [[0.25, 0.3, 0.5], [0.75, 0.1, 1.1], [1.5, 0.2, 0.2]]


def test_random_prompts_are_token_exact_and_seeded():
    specs = random_token_prompts(5, 37, 9, vocab_size=100, seed=3)
    assert all(len(s.prompt) == 37 == s.prompt_len and s.output_len == 9 for s in specs)
    assert all(0 <= t < 100 for s in specs for t in s.prompt)
    assert specs == random_token_prompts(5, 37, 9, vocab_size=100, seed=3)
    assert specs != random_token_prompts(5, 37, 9, vocab_size=100, seed=4)


def sharegpt_file(tmp_path):
    convs = [
        {"conversations": [{"from": "human", "value": "Tell me about tensor cores."},
                           {"from": "gpt", "value": "They multiply."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "too short prompt"}]},
        {"conversations": [{"from": "human", "value": "Only one turn here"}]},
        {"conversations": [{"from": "human", "value": "What is a mixture of experts?"},
                           {"from": "gpt", "value": "Many MLPs, a router picks a few."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    return path, convs


def test_sharegpt_first_exchanges_filtered_and_counted(tmp_path):
    from model.byte_tokenizer import ByteTokenizer

    path, convs = sharegpt_file(tmp_path)
    specs = load_sharegpt(path, 10, ByteTokenizer())
    usable = {convs[0]["conversations"][0]["value"]: convs[0]["conversations"][1]["value"],
              convs[3]["conversations"][0]["value"]: convs[3]["conversations"][1]["value"]}
    assert {s.prompt for s in specs} == set(usable)
    for s in specs:  # the byte tokenizer: one token per UTF-8 byte
        assert s.prompt_len == len(s.prompt.encode()) and s.output_len == len(usable[s.prompt].encode())
    with pytest.raises(ValueError, match="not valid JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        load_sharegpt(bad, 1, ByteTokenizer())


def test_conversations_share_a_system_prompt_and_resend_their_history():
    convs = make_conversations(2, 3, system_len=10, user_len=4, output_len=5, vocab_size=50, seed=1)
    assert convs[0].system == convs[1].system and len(convs[0].system) == 10
    assert convs[0].users != convs[1].users and all(0 <= t < 50 for c in convs for t in c.prompt(2))
    for conv in convs:
        assert [len(conv.prompt(t)) for t in range(3)] == [14, 23, 32]
        for t in range(2):  # each turn re-sends the previous prompt, then the reply stand-in and a new message
            assert conv.prompt(t + 1) == conv.prompt(t) + conv.replies[t] + conv.users[t + 1]
            assert len(conv.replies[t]) == 5
    assert make_conversations(2, 3, 10, 4, 5, 50, seed=1) == convs, "seeded"
    with pytest.raises(ValueError, match="must be >= 1"):
        make_conversations(0, 3, 10, 4, 5, 50)


# ---- against a real server -------------------------------------------------------------------------------------
def test_multi_turn_reports_ttft_per_turn_and_the_server_finds_each_history(served, tmp_path):  # noqa: F811
    import httpx

    assert httpx.post(served.base_url + "/reset_prefix_cache", json={}, headers=served.headers).status_code == 200
    before = parse_metrics(served.metrics_text())
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--dataset", "multi-turn",
                         "--num-conversations", "3", "--num-turns", "3", "--system-prompt-len", "40",
                         "--input-len", "8", "--output-len", "4", "--max-concurrency", "2", name="turns")
    after = parse_metrics(served.metrics_text())
    assert rc == 0 and (report["num_conversations"], report["num_turns"], report["system_prompt_len"]) == (3, 3, 40)
    [lv] = report["levels"]
    assert (lv["completed"], lv["failed"], lv["not_sent"], lv["max_concurrency"]) == (9, 0, 0, 2)
    assert lv["output_len_mismatches"] == 0 and lv["total_output_tokens"] == 9 * 4
    assert [(t["turn"], t["completed"], t["mean_prompt_len"]) for t in lv["turns"]] == \
        [(1, 3, 48), (2, 3, 60), (3, 3, 72)], "the server's usage counts the resent history"
    assert lv["ttft_ms_turn2plus"]["p50"] > 0 and all(t["ttft_ms"]["p50"] > 0 for t in lv["turns"])
    hits = metric(after, "staticmoe_prefix_cache_hits_total") - metric(before, "staticmoe_prefix_cache_hits_total")
    queries = (metric(after, "staticmoe_prefix_cache_queries_total")
               - metric(before, "staticmoe_prefix_cache_queries_total"))
    assert queries == 3 * (48 + 60 + 72)
    assert hits >= 3 * (48 + 48), "turns 2 and 3 find the previous turn's prompt (full blocks of 16)"


def test_turns_on_a_fixed_schedule_wait_for_their_slot_and_late_ones_are_counted(served):  # noqa: F811
    import asyncio

    from service.loadgen.multiturn import run_conversations, summarize_turns

    convs = make_conversations(2, 3, system_len=16, user_len=4, output_len=2, vocab_size=200, seed=3)

    def run(interval: float):
        return asyncio.run(run_conversations(served.base_url, convs, model=None, api_key=API_KEY,
                                             turn_interval_s=interval))

    scheduled = run(0.6)
    assert all(r.ok for _, r in scheduled.results) and len(scheduled.results) == 6
    assert scheduled.duration_s >= 2 * 0.6, "turn 3 is sent 1.2 s after the start, not before"
    assert scheduled.late_turns == 0 and summarize_turns(scheduled)["late_turns"] == 0
    crowded = run(0.0005)  # no turn is answered within half a millisecond
    assert crowded.late_turns == 2 * 2, "every turn after the first is late"
    with pytest.raises(ValueError, match="turn_interval_s must be >= 0"):
        asyncio.run(run_conversations(served.base_url, convs, model=None, turn_interval_s=-1))


def test_sweep_counts_tokens_and_writes_json_and_plots(served, tmp_path):  # noqa: F811
    before = parse_metrics(served.metrics_text())
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "24", "--output-len", "8",
                         "--sweep-concurrency", "1,4", "--num-prompts", "6", "--num-warmups", "1", name="sweep")
    after = parse_metrics(served.metrics_text())
    assert rc == 0
    assert {"benchmark", "date", "base_url", "model", "dataset", "input_len", "output_len", "levels"} <= set(report)
    assert [lv["max_concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert set(lv) == LEVEL_KEYS
        assert (lv["completed"], lv["failed"], lv["not_sent"]) == (6, 0, 0)
        assert lv["total_output_tokens"] == 6 * 8 and lv["output_len_mismatches"] == 0
        assert lv["total_input_tokens"] == 6 * 24 and lv["prompt_len_mismatches"] == 0
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            d = lv[m]
            assert 0 < d["p50"] <= d["p90"] <= d["p99"], (m, d)
        assert lv["ttft_ms"]["p50"] <= lv["e2el_ms"]["p50"]
        assert lv["output_throughput"] == pytest.approx(lv["total_output_tokens"] / lv["duration_s"])
    # the server counted the same tokens: 2 levels x 6 requests x 8, plus the warm-up request's 8
    served_tokens = metric(after, "staticmoe_generation_tokens_total") - metric(before, "staticmoe_generation_tokens_total")
    assert served_tokens == 2 * 6 * 8 + 8
    for png in ("sweep_throughput.png", "sweep_latency.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_time_limit_stops_new_requests(served, tmp_path):  # noqa: F811
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "8", "--output-len", "8",
                         "--max-concurrency", "1", "--num-prompts", "200", "--time-limit-s", "0.5")
    lv = report["levels"][0]
    assert rc == 0 and lv["failed"] == 0
    assert lv["completed"] >= 1 and lv["not_sent"] >= 1
    assert lv["completed"] + lv["not_sent"] == 200


def test_poisson_arrivals_spread_requests_out(served, tmp_path):  # noqa: F811
    # 4 arrivals at 2/s: three exponential gaps of mean 0.5 s (P(sum < 0.3 s) ~ 2%; seeded, so fixed)
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "8", "--output-len", "4",
                         "--request-rate", "2", "--num-prompts", "4")
    lv = report["levels"][0]
    assert rc == 0 and lv["completed"] == 4 and lv["request_rate"] == 2.0
    assert lv["duration_s"] > 0.3


def test_extra_body_reaches_every_request(served, tmp_path):  # noqa: F811
    """The same load with a feature on (the way issue 20's costs are measured): logprobs and a regex constraint
    that holds for every generated token; an unknown field in the extra body fails every request."""
    for extra in ('{"logprobs": 3}', '{"structured_outputs": {"regex": "[a-z ]{0,999}"}}'):
        rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "8", "--output-len",
                             "6", "--max-concurrency", "2", "--num-prompts", "2", "--extra-body", extra)
        lv = report["levels"][0]
        assert rc == 0 and lv["completed"] == 2 and lv["output_len_mismatches"] == 0, lv
        assert report["extra_body"] == json.loads(extra)
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "8", "--output-len", "4",
                         "--num-prompts", "2", "--extra-body", '{"no_such_field": 1}')
    assert report["levels"][0]["failed"] == 2 and "no_such_field" in str(report["levels"][0]["errors"])


def test_sharegpt_against_the_server(served, tmp_path):  # noqa: F811
    path, _ = sharegpt_file(tmp_path)
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--dataset", "sharegpt",
                         "--dataset-path", str(path), "--num-prompts", "2", "--max-concurrency", "2")
    lv = report["levels"][0]
    assert rc == 0 and lv["completed"] == 2
    assert lv["prompt_len_mismatches"] == 0 and lv["output_len_mismatches"] == 0  # server's usage = our counts


def test_wrong_api_key_is_counted_as_failed_requests(served, tmp_path, capsys):  # noqa: F811
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", "wrong", "--input-len", "8", "--output-len", "4",
                         "--max-concurrency", "2", "--num-prompts", "3")
    lv = report["levels"][0]
    assert rc == 1
    assert (lv["completed"], lv["failed"]) == (0, 3)
    [(message, count)] = lv["errors"].items()
    assert count == 3 and message.startswith("HTTP 401")
    assert "3 failed: HTTP 401" in capsys.readouterr().err


def test_unreachable_server_is_counted_as_failed_requests(tmp_path):
    rc, report = run_cli(tmp_path, f"http://127.0.0.1:{free_port()}", "--input-len", "8", "--output-len", "4",
                         "--max-concurrency", "2", "--num-prompts", "3")
    lv = report["levels"][0]
    assert rc == 1 and (lv["completed"], lv["failed"]) == (0, 3)
    assert all(m.startswith("cannot connect") for m in lv["errors"])


@pytest.mark.parametrize("argv, message", [
    ([], "--base-url"),
    (["--base-url", "localhost:8000"], "must look like http://HOST:PORT"),
    (["--base-url", "http://x", "--max-concurrency", "0"], "must be >= 1"),
    (["--base-url", "http://x", "--sweep-concurrency", "1,x"], "comma list of integers"),
    (["--base-url", "http://x", "--sweep-concurrency", "1,4", "--max-concurrency", "2"], "not both"),
    (["--base-url", "http://x", "--dataset", "sharegpt"], "needs --dataset-path"),
    (["--base-url", "http://x", "--dataset", "sharegpt", "--dataset-path", "/nonexistent.json", "--tokenizer",
      "tiny"], "is not a file"),
    (["--base-url", "http://x"], "need a vocabulary"),
    (["--base-url", "http://x", "--request-rate", "-1", "--model", "tiny"], "must be > 0"),
    (["--base-url", "http://x", "--model", "tiny", "--dataset", "multi-turn", "--sweep-concurrency", "1,2"],
     "takes --max-concurrency"),
    (["--base-url", "http://x", "--model", "tiny", "--dataset", "multi-turn", "--system-prompt-len", "-1"],
     "must be >= 0"),
])
def test_bad_arguments_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        loadgen.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_vocabulary_is_a_clear_error(tmp_path, capsys):
    assert loadgen.main(["--base-url", "http://127.0.0.1:1", "--model", "no-such-model"]) == 2
    assert "give --vocab-size or --tokenizer" in capsys.readouterr().err


def test_console_entry_point_reaches_the_load_generator():
    result = subprocess.run([sys.executable, "-m", "service", "bench", "serve", "--sweep-concurrency", "0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "staticmoe bench serve" in result.stderr and "positive integers" in result.stderr


def test_requests_split_over_client_processes_are_all_counted(served, tmp_path):  # noqa: F811
    """--client-processes 2: the level's requests, concurrency and turns are shared by two spawned client processes
    and merged into one report; the server counts exactly the tokens the merged report claims."""
    before = parse_metrics(served.metrics_text())
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--input-len", "16", "--output-len", "5",
                         "--max-concurrency", "3", "--num-prompts", "7", "--client-processes", "2", name="split")
    mid = parse_metrics(served.metrics_text())
    [lv] = report["levels"]
    assert rc == 0 and (lv["completed"], lv["failed"], lv["not_sent"]) == (7, 0, 0)
    assert lv["total_output_tokens"] == 7 * 5 and lv["output_len_mismatches"] == 0
    assert metric(mid, "staticmoe_generation_tokens_total") - metric(before, "staticmoe_generation_tokens_total") == 35
    rc, report = run_cli(tmp_path, served.base_url, "--api-key", API_KEY, "--dataset", "multi-turn",
                         "--num-conversations", "3", "--num-turns", "2", "--system-prompt-len", "16",
                         "--input-len", "8", "--output-len", "3", "--client-processes", "2", name="split_turns")
    [lv] = report["levels"]
    assert rc == 0 and (lv["completed"], lv["failed"]) == (6, 0)
    assert [(t["turn"], t["completed"]) for t in lv["turns"]] == [(1, 3), (2, 3)]
    assert 0 < lv["duration_s"] < 60


def test_shard_counts_cover_the_total():
    from service.loadgen.processes import shard_counts

    assert shard_counts(7, 3) == [3, 2, 2] and shard_counts(2, 4) == [1, 1, 0, 0] and sum(shard_counts(64, 5)) == 64
