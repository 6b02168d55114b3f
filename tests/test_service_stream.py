"""Streaming under load, clients that leave mid-request, and the SIGTERM drain, over real loopback HTTP."""

import asyncio
import json
import signal
import time

import httpx
import pytest

from benchmarks.moe_cases import moe_flops

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import ServerProcess, metric, parse_metrics, wait_for  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]


async def read_stream(http: httpx.AsyncClient, body: dict, path: str = "/v1/completions") -> dict:
    """One SSE request: its events (parsed), raw lines, and when its first and last events arrived."""
    events, started = [], time.monotonic()
    first = last = None
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            now = time.monotonic()
            first = first or now
            last = now
            events.append(line[len("data: "):])
    return {"events": events, "started": started, "first": first, "last": last}


def test_64_concurrent_streams_all_complete_and_overlap(served):
    max_tokens = 32  # long enough that 64 connections opened by a loaded client still overlap

    async def run():
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(base_url=served.base_url, headers=served.headers, timeout=120,
                                     limits=limits) as http:
            bodies = [{"prompt": f"stream {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "temperature": 0, "stream_options": {"include_usage": True}} for i in range(64)]
            return await asyncio.gather(*(read_stream(http, b) for b in bodies))

    results = asyncio.run(run())
    for i, result in enumerate(results):
        assert result["events"][-1] == "[DONE]"
        chunks = [json.loads(e) for e in result["events"][:-1]]
        text_chunks = [c for c in chunks if c["choices"]]
        assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
        usage = chunks[-1]["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert usage["prompt_tokens"] == len(f"stream {i}".encode())
    # they ran together: every stream had started producing before the first one finished
    first_finish = min(r["last"] for r in results)
    assert sum(r["first"] < first_finish for r in results) >= 48
    samples = parse_metrics(served.metrics_text())
    assert metric(samples, "staticmoe_num_requests_running") == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_every_generated_token_gets_its_own_chunk_even_without_new_text(served, path):
    """The tiny model's byte tokens often end inside a UTF-8 character, so their text is empty until a later token
    completes it. Clients time tokens by chunks (TTFT, ITL), so each token still gets one chunk, as in vLLM."""
    n = 24
    chat = path.endswith("chat/completions")
    body = {"max_tokens": n, "ignore_eos": True, "temperature": 0, "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": "bytes"}]} if chat else {"prompt": "bytes"})}

    async def run():
        async with httpx.AsyncClient(base_url=served.base_url, headers=served.headers, timeout=60) as http:
            whole = (await http.post(path, json={k: v for k, v in body.items() if k != "stream_options"})).json()
            return whole, await read_stream(http, {**body, "stream": True}, path)

    whole, streamed = asyncio.run(run())
    assert streamed["events"][-1] == "[DONE]"
    chunks = [json.loads(e) for e in streamed["events"][:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if chat:
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        choices = choices[1:]
    texts = [c["delta"]["content"] if chat else c["text"] for c in choices]
    assert len(choices) == n == chunks[-1]["usage"]["completion_tokens"]
    assert "" in texts, "no token without text: this prompt no longer exercises held-back text"
    assert choices[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in choices[:-1])
    expected = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
    assert "".join(texts) == expected


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(served):
    before = parse_metrics(served.metrics_text())
    long_body = {"prompt": "keep going", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.base_url, headers=served.headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=long_body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few tokens in: blocks are allocated
            assert any(line.startswith("data: {") for line in received)
            mid = parse_metrics(served.metrics_text())
            assert metric(mid, "staticmoe_kv_cache_usage_perc") > 0
            assert metric(mid, "staticmoe_num_requests_running") == 1
        # leaving the `with` closes the connection mid-stream

    def freed():
        now = parse_metrics(served.metrics_text())
        aborted = metric(now, "staticmoe_request_success_total", finished_reason="abort") - \
            metric(before, "staticmoe_request_success_total", finished_reason="abort")
        return now if (aborted == 1 and metric(now, "staticmoe_kv_cache_usage_perc") == 0
                       and metric(now, "staticmoe_num_requests_running") == 0) else None

    after = wait_for(freed, timeout=15)
    generated = metric(after, "staticmoe_generation_tokens_total") - metric(before, "staticmoe_generation_tokens_total")
    assert 0 < generated < 400  # stopped early, not run to max_tokens


def test_client_disconnect_during_non_streaming_request_aborts_it(served):
    before = parse_metrics(served.metrics_text())
    body = {"prompt": "slow", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(served.base_url + "/v1/completions", json=body, headers=served.headers, timeout=0.3)

    def aborted():
        now = parse_metrics(served.metrics_text())
        return (metric(now, "staticmoe_request_success_total", finished_reason="abort")
                - metric(before, "staticmoe_request_success_total", finished_reason="abort") == 1
                and metric(now, "staticmoe_kv_cache_usage_perc") == 0)

    wait_for(aborted, timeout=15)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones():
    server = ServerProcess(["--max-num-seqs", "4"]).wait_healthy()
    try:
        body = {"prompt": "drain", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: {")
                server.proc.send_signal(signal.SIGTERM)
                refused = wait_for(lambda: (r := httpx.post(server.base_url + "/v1/completions",
                                                            json={"prompt": "late", "max_tokens": 2})
                                            ).status_code == 503 and r, timeout=10)
                assert refused.json()["error"]["code"] == "shutting_down"
                assert httpx.get(server.base_url + "/health").status_code == 503
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            final = json.loads(rest[-2][len("data: "):])
            assert final["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(30) == 0  # exits on its own once drained
    finally:
        server.stop()


@pytest.mark.gpu
def test_gpu_olmoe_64_streams_through_the_cuda_kernel_with_metrics_checked():
    """H100: random-weight olmoe-1b-7b through the CUDA MoE path under 64 concurrent streams; the metrics must
    account for exactly the tokens served. Writes test-artifacts/service_gpu_olmoe.json for the record."""
    import os
    from pathlib import Path

    from model.presets import PRESETS
    from tests.service_fixtures import REPO_ROOT

    cfg = PRESETS["olmoe-1b-7b"]
    layers, k, hidden, inter = (cfg["num_hidden_layers"], cfg["num_experts_per_tok"], cfg["hidden_size"],
                                cfg["intermediate_size"])
    server = ServerProcess(["--preset", "olmoe-1b-7b", "--random-weights", "--device", "cuda",
                            "--max-num-seqs", "64", "--max-model-len", "1024"],
                           env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    try:
        server.wait_healthy(timeout=900)
        assert "kernel path: CUDA" in server.log_text()
        def settled():
            samples = parse_metrics(server.metrics_text())
            return samples if metric(samples, "staticmoe_num_requests_running") == 0 else None

        before = wait_for(settled)
        max_tokens = 128
        prompts = [("request %d: " % i) + "moe " * (4 + i % 24) for i in range(64)]

        async def run():
            limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as http:
                bodies = [{"prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                           "temperature": 0.8, "seed": i} for i, p in enumerate(prompts)]
                return await asyncio.gather(*(read_stream(http, b) for b in bodies))

        started = time.monotonic()
        results = asyncio.run(run())
        wall = time.monotonic() - started
        assert all(r["events"][-1] == "[DONE]" for r in results)
        tokens_served = sum(len(p.encode()) + max_tokens - 1 for p in prompts)
        per_token = layers * moe_flops(1, k, hidden, inter)

        def accounted():  # expert counters arrive by asynchronous device->host copies
            s = parse_metrics(server.metrics_text())
            experts = metric(s, "staticmoe_expert_tokens_total") - metric(before, "staticmoe_expert_tokens_total")
            return s if experts == tokens_served * k * layers else None

        after = wait_for(accounted, timeout=60)
        delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
        assert delta("staticmoe_moe_flops_total") == tokens_served * per_token
        assert delta("staticmoe_generation_tokens_total") == 64 * max_tokens
        assert delta("staticmoe_moe_kernel_seconds_count") >= 1
        utilization = metric(after, "staticmoe_moe_tensor_core_utilization")
        assert 0 < utilization <= 1
        record = {
            "device": [line for line in server.log_text().splitlines() if "loaded in" in line][-1],
            "streams": 64, "max_tokens": max_tokens, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(64 * max_tokens / wall, 1), "moe_tensor_core_utilization": utilization,
            "moe_kernel_seconds_mean": delta("staticmoe_moe_kernel_seconds_sum") /
            delta("staticmoe_moe_kernel_seconds_count"),
            "ttft_mean_s": delta("staticmoe_time_to_first_token_seconds_sum") /
            delta("staticmoe_time_to_first_token_seconds_count"),
            "itl_mean_s": delta("staticmoe_inter_token_latency_seconds_sum") /
            delta("staticmoe_inter_token_latency_seconds_count"),
            "expert_load_imbalance": {l: metric(after, "staticmoe_expert_load_imbalance", layer=str(l))
                                      for l in range(layers)},
        }
        out = Path(REPO_ROOT) / "test-artifacts" / "service_gpu_olmoe.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
    finally:
        server.stop()
