"""Bounded work per request, over real HTTP (issue 17 items 1, 2, 7): a request that would occupy the engine thread
or the event loop for long is refused before any work is queued, with a 400 that names the field, and quickly."""

import concurrent.futures
import json
import re
import time

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import ServerProcess  # noqa: E402

CAPACITY = 64 + 64  # --max-num-seqs + --max-queue below


@pytest.fixture(scope="module")
def server():
    """Default body limit (1 MiB), so the bodies of the issue reach the handlers."""
    process = ServerProcess(["--max-num-seqs", "64", "--max-queue", "64", "--max-model-len", "512"])
    try:
        yield process.wait_healthy()
    finally:
        process.stop()


def post_raw(server, body: bytes, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=timeout)


def peak_rss_mib(server) -> int:
    status = open(f"/proc/{server.proc.pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) // 1024


def assert_refused(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error


def test_one_mib_of_stop_strings_with_n_128_is_refused_at_once(server):
    """16 stop strings of 60,000 characters and n=128: before, accepted and ~15 ms of stop checks per token for
    every choice on the engine thread; now a 400 within a second (the limit is 1024 characters per string)."""
    body = json.dumps({"prompt": "a", "n": 128, "max_tokens": 200, "stop": ["ab" * 30000] * 16}).encode()
    assert len(body) < 1 << 20
    started = time.monotonic()
    error = assert_refused(post_raw(server, body, timeout=5), "stop")
    assert time.monotonic() - started < 1.0
    assert "1024" in error["message"]


def test_stop_strings_at_the_limit_with_n_128_complete(server):
    stops = [("ab" * 512)[:1023] + chr(0x4E00 + i) for i in range(16)]
    body = {"prompt": "a", "n": 128, "max_tokens": 48, "ignore_eos": True, "stop": stops}
    response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 128


def test_stop_token_ids_are_capped(server):
    assert_refused(post_raw(server, json.dumps({"prompt": "a", "stop_token_ids": list(range(1025))}).encode()),
                   "stop_token_ids")
    response = post_raw(server, json.dumps({"prompt": "a", "max_tokens": 2,
                                            "stop_token_ids": list(range(300, 1324))}).encode())
    assert response.status_code == 200, response.text


def test_250k_prompt_batch_is_refused_fast_without_a_memory_spike(server):
    """A 1 MB body of 250,000 one-token prompts with n=128: before, 2.2 s and +450 MB of tokenized and expanded
    prompts on the event loop before the capacity error; now refused by the schema's batch limit at once."""
    body = json.dumps({"prompt": ["a"] * 250_000, "n": 128}, separators=(",", ":")).encode()
    assert len(body) < 1 << 20
    before = peak_rss_mib(server)
    started = time.monotonic()
    assert_refused(post_raw(server, body, timeout=10), "prompt")
    assert time.monotonic() - started < 1.0
    token_lists = json.dumps({"prompt": [[1]] * 200_000, "n": 128}, separators=(",", ":")).encode()
    assert_refused(post_raw(server, token_lists, timeout=10), "prompt")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # six at once no longer serialize the server
        started = time.monotonic()
        answers = list(pool.map(lambda _: post_raw(server, body, timeout=20), range(6)))
        health = httpx.get(server.base_url + "/health", timeout=20)
    assert all(a.status_code == 400 for a in answers) and health.status_code == 200
    assert time.monotonic() - started < 5.0
    assert peak_rss_mib(server) - before < 150, "the refused bodies were expanded in memory"


def test_capacity_error_names_the_field_that_is_too_large(server):
    error = assert_refused(post_raw(server, json.dumps({"prompt": ["a"] * (CAPACITY + 1)}).encode()), "prompt")
    assert f"{CAPACITY + 1} prompts" in error["message"]
    error = assert_refused(post_raw(server, json.dumps({"prompt": ["a", "b"], "n": 100}).encode()), "n")
    assert "200" in error["message"] and str(CAPACITY) in error["message"]


def test_temperature_below_the_greedy_bound_is_greedy(server):
    """1e-40 underflowed to NaN probabilities: token 0 (NUL) every time. Below 1e-5 it is greedy (documented)."""
    def text(temperature):
        body = {"prompt": "Hello", "max_tokens": 12, "ignore_eos": True, "temperature": temperature, "seed": 3}
        response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    greedy = text(0.0)
    assert "\x00" not in greedy
    for tiny in (1e-40, 1e-30, 5e-6):
        assert text(tiny) == greedy, tiny
