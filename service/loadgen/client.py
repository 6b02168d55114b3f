"""The load generator's HTTP side: streamed /v1/completions requests, timed per chunk, sent at a fixed concurrency
or as a Poisson process, with a bound on the number of requests and on the time spent issuing them.

Timing follows vLLM's benchmark_serving: TTFT = arrival of the first chunk carrying a choice; each later chunk adds
an inter-token latency (gap to the previous chunk); the output token count is the server's `usage`
(`stream_options.include_usage`). httpx (not the openai client) parses the SSE lines, so at high concurrency the
client's own per-chunk cost stays small next to what it measures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from service.loadgen.dataset import PromptSpec

COMPLETIONS_PATH = "/v1/completions"


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int             # the server's usage.prompt_tokens when it reports one, else the client's count
    expected_prompt_len: int
    expected_output_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0      # end to end: request sent -> its last chunk with choices (vLLM's definition)
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    sent_at: float = 0.0        # time.perf_counter() when sent: one clock for every client process of the machine


@dataclass
class LevelRun:
    """One load level: its settings, every sent request's result, and the wall time from first send to last end."""
    max_concurrency: int | None
    request_rate: float
    results: list[RequestResult]
    not_sent: int               # requests skipped because the time limit passed before they started
    duration_s: float


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:200]
    return f"HTTP {status}: {message}"


async def send_completion(client: httpx.AsyncClient, url: str, headers: dict, model: str | None,
                          spec: PromptSpec, temperature: float = 0.0, extra_body: dict | None = None) -> RequestResult:
    """One streamed completion; every failure (connection, status, in-band error, cut stream) is a failed result.
    `extra_body`: more request fields (logprobs, structured_outputs, ...) merged into every request."""
    payload = {"prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra_body or {})}
    if model:
        payload["model"] = model
    result = RequestResult(False, spec.prompt_len, spec.prompt_len, spec.output_len)
    chunks, usage_tokens, done = 0, None, False
    start = last = result.sent_at = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                result.error = _error_text(response.status_code, await response.aread())
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in stream: {chunk['error'].get('message', chunk['error'])}"
                    return result
                if chunk.get("choices"):
                    if chunks == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    chunks += 1
                    last = now
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    result.prompt_len = chunk["usage"].get("prompt_tokens", result.prompt_len)
    except httpx.ConnectError as err:
        result.error = f"cannot connect to {url}: {err}"
        return result
    except httpx.TimeoutException as err:
        result.error = f"timed out: {type(err).__name__} {err}"
        return result
    except (httpx.HTTPError, ValueError) as err:  # ValueError: a chunk that is not JSON
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency_s = last - start  # the last token's chunk, not [DONE] (as vLLM's benchmark; TPOT follows)
    if not done:
        result.error = "the stream ended without data: [DONE]"
    elif chunks == 0:
        result.error = "the stream carried no completion chunk"
    else:
        result.ok = True
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return result


async def run_level(base_url: str, specs: list[PromptSpec], *, model: str | None, api_key: str | None = None,
                    max_concurrency: int | None = None, request_rate: float = float("inf"),
                    time_limit_s: float | None = None, seed: int = 0, temperature: float = 0.0,
                    request_timeout_s: float = 600.0, extra_body: dict | None = None, processes: int = 1) -> LevelRun:
    """Send `specs` in order. Arrivals: all at once (rate inf) or Poisson at `request_rate`/s; at most
    `max_concurrency` in flight. After `time_limit_s` no new request starts; those in flight finish.
    processes > 1: the specs, the concurrency and the rate are split over that many client processes
    (service/loadgen/processes.py says why); the results are merged into one level."""
    if processes > 1:
        return await _run_level_sharded(base_url, specs, processes, model=model, api_key=api_key,
                                        max_concurrency=max_concurrency, request_rate=request_rate,
                                        time_limit_s=time_limit_s, seed=seed, temperature=temperature,
                                        request_timeout_s=request_timeout_s, extra_body=extra_body)
    url = base_url.rstrip("/") + COMPLETIONS_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or len(specs)
    gate = asyncio.Semaphore(limit)
    rng = random.Random(seed)
    start = time.perf_counter()
    deadline = start + time_limit_s if time_limit_s else None

    def expired() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=10.0),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as client:
        async def limited(spec: PromptSpec) -> RequestResult | None:
            async with gate:
                if expired():
                    return None
                return await send_completion(client, url, headers, model, spec, temperature, extra_body)

        tasks = []
        for i, spec in enumerate(specs):
            if i and request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
            if expired():
                break
            tasks.append(asyncio.create_task(limited(spec)))
        outcomes = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    results = [r for r in outcomes if r is not None]
    return LevelRun(max_concurrency, request_rate, results, len(specs) - len(results), duration)


async def _run_level_sharded(base_url: str, specs: list[PromptSpec], processes: int, *, max_concurrency,
                             request_rate: float, seed: int, **common) -> LevelRun:
    from service.loadgen.processes import run_sharded, shard_counts

    limit = max_concurrency or len(specs)
    parts = max(1, min(processes, limit, len(specs)))
    shards = [dict(base_url=base_url, specs=specs[i::parts], max_concurrency=c, request_rate=request_rate / parts,
                   seed=seed + i, **common) for i, c in enumerate(shard_counts(limit, parts))]
    runs, duration = await run_sharded(run_level, shards)
    results = [r for run in runs for r in run.results]
    return LevelRun(max_concurrency, request_rate, results, sum(run.not_sent for run in runs), duration)
