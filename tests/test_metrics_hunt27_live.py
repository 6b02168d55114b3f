"""Metrics hunt 27: every /metrics value of a live CPU server (tiny model) against what the responses and the model
actually did. Per-expert counts are checked against the routing recomputed, in the server process, by a forward
hook on each MoE block (softmax top-k of the block's own input, the reference router): so chunked prefill,
prefix-cache hits, n > 1 and preemption recompute count exactly what was computed. Samples are read with
prometheus_client's own text parser."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_fixtures import ServerProcess, wait_for

# The server, with a forward hook on every SparseMoeBlock that recounts its routing from its input x [N, H] and
# writes the cumulative counts (and rows seen) to $HUNT27_ROUTING after each call.
HOOKED_SERVER = r"""
import json, os, sys, threading
import torch
from model.layers.moe import SparseMoeBlock

PATH = os.environ["HUNT27_ROUTING"]
counts, rows, lock = {}, {}, threading.Lock()
original = SparseMoeBlock.forward

def forward(self, x):
    logits = x.float() @ self.gate.weight.float().T  # [N, E]
    if self.gate.bias is not None:
        logits = logits + self.gate.bias.float()
    chosen = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1).indices  # [N, k]
    got = torch.bincount(chosen.flatten(), minlength=self.num_experts).tolist()
    with lock:
        layer = str(self.layer_idx)
        counts[layer] = [a + b for a, b in zip(counts.get(layer, [0] * self.num_experts), got)]
        rows[layer] = rows.get(layer, 0) + x.shape[0]
        with open(PATH + ".tmp", "w") as f:
            json.dump({"counts": counts, "rows": rows}, f)
        os.replace(PATH + ".tmp", PATH)
    return original(self, x)

SparseMoeBlock.forward = forward
from service.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""

COUNTERS = ("_total", "_count", "_sum", "_bucket")


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value}, parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels) -> float:
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def idle(server):
    samples = scrape(server)
    busy = value(samples, "staticmoe_num_requests_running") + value(samples, "staticmoe_num_requests_waiting")
    return samples if busy == 0 else None


class HookedServer(ServerProcess):
    def __init__(self, args):
        self.routing_path = Path(tempfile.mkdtemp(prefix="hunt27-")) / "routing.json"
        super().__init__(args, env={"HUNT27_ROUTING": str(self.routing_path)}, entry=["-c", HOOKED_SERVER])

    def routing(self) -> dict:
        if not self.routing_path.exists():
            return {"counts": {}, "rows": {}}
        return json.loads(self.routing_path.read_text())


@pytest.fixture(scope="module")
def server():
    # a small KV pool (preemption under concurrency), a small prefill budget (chunked prefill), vLLM names on
    s = HookedServer(["--max-num-seqs", "8", "--max-queue", "64", "--max-model-len", "256",
                      "--num-kv-blocks", "40", "--max-num-batched-tokens", "48", "--vllm-metric-names",
                      "--seed", "0"])
    try:
        yield s.wait_healthy()
    finally:
        s.stop()


def monotone_watch(server, stop: threading.Event, problems: list):
    """Scrape until `stop`; note any counter-like sample that went down between two scrapes."""
    last = {}
    while not stop.is_set():
        try:
            samples = scrape(server)
        except httpx.HTTPError:
            continue
        for key, v in samples.items():
            if key[0].endswith(COUNTERS) and key in last and v < last[key]:
                problems.append((key, last[key], v))
        last = samples
        time.sleep(0.02)


def post(http, path, body):
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream_usage(http, body) -> tuple[dict, list[str]]:
    usage, reasons = None, []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                     "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
    return usage, reasons


def test_request_counters_histograms_and_expert_counts_match_what_was_served(server):
    before = wait_for(lambda: idle(server))
    routing_before = server.routing()
    stop, problems = threading.Event(), []
    watcher = threading.Thread(target=monotone_watch, args=(server, stop, problems), daemon=True)
    watcher.start()

    engine_requests = []  # (prompt tokens, generated tokens counted, finish reason, echo-only)
    long_prompt = "The static batching of irregular workloads " * 3  # > the 48-token prefill budget: chunked
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        # plain, n > 1, echo with and without new tokens, a stop token, a chat, a repeated prompt (prefix hit)
        for body in (
                {"prompt": "hello experts", "max_tokens": 5, "ignore_eos": True},
                {"prompt": "n choices", "max_tokens": 4, "n": 3, "temperature": 1.0, "ignore_eos": True},
                {"prompt": "echo only", "max_tokens": 0, "echo": True},
                {"prompt": "echo more", "max_tokens": 3, "echo": True, "ignore_eos": True},
                {"prompt": "stop at once", "max_tokens": 9, "stop_token_ids": list(range(256))},
                {"prompt": long_prompt, "max_tokens": 3, "ignore_eos": True},
                {"prompt": long_prompt, "max_tokens": 2, "ignore_eos": True}):
            answer = post(http, "/v1/completions", {**body, "temperature": body.get("temperature", 0)})
            n = body.get("n", 1)
            prompt = answer["usage"]["prompt_tokens"]
            per_choice = []
            for choice in answer["choices"]:
                per_choice.append(choice["finish_reason"])
            generated = answer["usage"]["completion_tokens"]
            if body.get("max_tokens") == 0:  # documented: one token generated and dropped, counted
                engine_requests.append((prompt, 1, "length", True))
                continue
            assert generated % n == 0 or n == 1
            for reason in per_choice:
                engine_requests.append((prompt, generated // n if n > 1 else generated, reason, False))
        chat = post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        engine_requests.append((chat["usage"]["prompt_tokens"], chat["usage"]["completion_tokens"],
                                chat["choices"][0]["finish_reason"], False))
        usage, reasons = stream_usage(http, {"prompt": "streamed", "max_tokens": 6, "ignore_eos": True})
        engine_requests.append((usage["prompt_tokens"], usage["completion_tokens"], reasons[0], False))

        # concurrency over a small KV pool: preemptions by recompute
        answers = []

        def one(i):
            with httpx.Client(base_url=server.base_url, timeout=120) as h:
                answers.append(post(h, "/v1/completions", {"prompt": f"preempt me {i} " * 4, "max_tokens": 60,
                                                           "temperature": 0, "ignore_eos": True}))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(answers) == 8
        for a in answers:
            engine_requests.append((a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"],
                                    a["choices"][0]["finish_reason"], False))

    after = wait_for(lambda: idle(server))
    time.sleep(0.6)  # one more MoE publish interval; the engine publishes once more when it goes idle
    after = scrape(server)
    stop.set()
    watcher.join(10)
    routing_after = server.routing()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert problems == [], f"counters went down between scrapes: {problems[:5]}"
    assert delta("staticmoe_num_preemptions_total") > 0, "the test meant to preempt"

    requests = len(engine_requests)
    prompt_sum = sum(p for p, _, _, _ in engine_requests)
    generated_sum = sum(g for _, g, _, _ in engine_requests)
    assert delta("staticmoe_prompt_tokens_total") == prompt_sum
    assert delta("staticmoe_generation_tokens_total") == generated_sum
    assert delta("staticmoe_request_prompt_tokens_sum") == prompt_sum
    assert delta("staticmoe_request_generation_tokens_sum") == generated_sum
    for reason in ("stop", "length", "abort", "error"):
        want = sum(1 for _, _, r, _ in engine_requests if r == reason)
        assert delta("staticmoe_request_success_total", finished_reason=reason) == want, reason
    for family in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                   "request_prompt_tokens", "request_generation_tokens"):
        assert delta(f"staticmoe_{family}_count") == requests, family
    assert delta("staticmoe_inter_token_latency_seconds_count") == sum(g - 1 for _, g, _, _ in engine_requests)
    # sane latencies: every observation lies in [0, the test's wall time]
    for family in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert 0 < delta(f"staticmoe_{family}_sum")
    assert delta("staticmoe_e2e_request_latency_seconds_sum") >= delta("staticmoe_time_to_first_token_seconds_sum")

    # prefix cache: every engine request's prompt is looked up once (none asked for prompt_logprobs); the repeated
    # long prompt finds at least its full blocks but the last token's
    assert delta("staticmoe_prefix_cache_queries_total") == prompt_sum
    long_tokens = next(p for p, _, _, _ in engine_requests if p > 100)
    assert delta("staticmoe_prefix_cache_hits_total") >= (long_tokens - 1) // 16 * 16

    # gauges back to rest
    for gauge in ("staticmoe_num_requests_running", "staticmoe_num_requests_waiting", "staticmoe_kv_cache_usage_perc"):
        assert value(after, gauge) == 0, gauge

    # MoE FLOPs: the analytic count of the rows computed (hook), less rows computed for a sequence that had already
    # stopped (async scheduling: at most one per early stop), which are not served
    rows = {layer: n - routing_before["rows"].get(layer, 0) for layer, n in routing_after["rows"].items()}
    assert len(set(rows.values())) == 1 and min(rows.values()) > 0, rows
    computed = next(iter(rows.values()))
    blocks = len(rows)
    early_stops = sum(1 for _, _, r, _ in engine_requests if r == "stop")
    flops_per_row = tiny_flops_per_token() * blocks
    assert computed - early_stops <= delta("staticmoe_moe_flops_total") / flops_per_row <= computed
    assert delta("staticmoe_moe_kernel_seconds_count") > 0  # the CPU times sampled steps by the wall clock
    assert value(after, "staticmoe_moe_peak_flops") == 0 and value(after, "staticmoe_moe_tensor_core_utilization") == 0

    # per-expert counts: exactly the routing the model computed (hook), nothing for cached prefixes or padding
    for layer, counts in routing_after["counts"].items():
        was = routing_before["counts"].get(layer, [0] * len(counts))
        for expert, (now, then) in enumerate(zip(counts, was)):
            assert delta("staticmoe_expert_tokens_total", layer=layer, expert=expert) == now - then, (layer, expert)


def tiny_flops_per_token() -> int:
    """Routed-expert FLOPs of one token in one MoE layer of the tiny preset, from its config: 2·k·H·2I + 2·k·I·H."""
    from tests.reference_model import tiny_reference_model

    cfg = tiny_reference_model().config
    k, h, i = cfg.top_k, cfg.hidden_size, cfg.moe_intermediate_size
    return 2 * k * h * 2 * i + 2 * k * i * h


def test_vllm_named_series_equal_ours_in_the_same_scrape(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        post(http, "/v1/completions", {"prompt": "mirror", "max_tokens": 3})
    samples = wait_for(lambda: idle(server))
    mirrored = 0
    for (name, labels), v in samples.items():
        if name.startswith("vllm:"):
            base = name[len("vllm:"):]
            base = {"gpu_cache_usage_perc": "kv_cache_usage_perc"}.get(base, base)
            base = base.replace("time_per_output_token_seconds", "inter_token_latency_seconds")
            assert samples[("staticmoe_" + base, labels)] == v, name
            mirrored += 1
    ours = {n for n, _ in samples if n.startswith("staticmoe_") and "moe" not in n and "expert" not in n
            and "rejected" not in n}
    assert {("vllm:" + n[len("staticmoe_"):]) for n in ours} <= {n for n, _ in samples}
    assert mirrored > 0
