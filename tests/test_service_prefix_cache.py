"""Prefix caching through the HTTP service: the API key guards POST /reset_prefix_cache, which empties the cache,
and staticmoe_prefix_cache_{queries,hits}_total count tokens exactly as the engine found them."""

import random

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import metric, parse_metrics, wait_for  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]
RESET = "/reset_prefix_cache"


def counters(server) -> tuple[float, float]:
    samples = parse_metrics(server.metrics_text())
    return (metric(samples, "staticmoe_prefix_cache_queries_total", model_name="tiny"),
            metric(samples, "staticmoe_prefix_cache_hits_total", model_name="tiny"))


def idle(server) -> bool:
    samples = parse_metrics(server.metrics_text())
    return metric(samples, "staticmoe_num_requests_running") + metric(samples, "staticmoe_num_requests_waiting") == 0


def complete(server, prompt: list[int], max_tokens: int) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens


def test_reset_prefix_cache_needs_the_api_key(served):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(served.base_url + RESET, json={}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(served.base_url + RESET, json={}, headers=served.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["prefix_caching"] is True and body["blocks_dropped"] >= 0
    assert httpx.get(served.base_url + RESET, headers=served.headers).status_code == 405


def test_counters_count_tokens_and_reset_empties_the_cache(served):
    wait_for(lambda: idle(served))
    assert httpx.post(served.base_url + RESET, json={}, headers=served.headers).status_code == 200
    rng = random.Random(22)
    prompt = [rng.randrange(32, 127) for _ in range(50)]
    queries, hits = counters(served)
    complete(served, prompt, 5)  # computes 54 tokens: 3 full blocks of 16 are cached
    complete(served, prompt + [rng.randrange(32, 127) for _ in range(20)], 5)  # finds those 3
    assert counters(served) == (queries + 50 + 70, hits + 48)
    # the second request computed 74 tokens, 4 full blocks, 3 of them shared: 4 cached blocks in all
    assert httpx.post(served.base_url + RESET, json={}, headers=served.headers).json()["blocks_dropped"] == 4
    complete(served, prompt, 1)
    assert counters(served) == (queries + 50 + 70 + 50, hits + 48), "nothing is found after the reset"
