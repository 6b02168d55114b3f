"""service/loadgen/client.py against vLLM's benchmark request function
(vllm/benchmarks/lib/endpoint_request_func.py, async_request_openai_completions): TTFT at the first chunk with
choices, ITL between chunks with choices, the token count from `usage`, and E2E latency = the last chunk *with
choices* − send (`output.latency = most_recent_timestamp - st`; the trailing usage chunk and [DONE] carry no
token). TPOT = (E2E − TTFT) / (tokens − 1) inherits E2E. A scripted SSE stream with known gaps checks each."""

import asyncio
import json

import httpx
import pytest

from service.loadgen.client import send_completion
from service.loadgen.dataset import PromptSpec

GAP_S, TAIL_S = 0.05, 0.25  # between token chunks; from the last token chunk to usage + [DONE]


def chunk(text, finish=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}


class Script(httpx.AsyncByteStream):
    async def __aiter__(self):
        for i in range(4):
            await asyncio.sleep(GAP_S)
            yield f"data: {json.dumps(chunk('x', 'length' if i == 3 else None))}\n\n".encode()
        await asyncio.sleep(TAIL_S)  # a server slow to close the stream: no token arrives here
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
        yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()


def run():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=Script()))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_completion(client, "http://test/v1/completions", {}, "m", PromptSpec([1, 2, 3], 3, 5))
    return asyncio.run(go())


def test_ttft_itl_and_usage_count():
    r = run()
    assert r.ok
    assert r.output_tokens == 5, "the count is the server's usage, not the 4 chunks"
    assert r.ttft_s == pytest.approx(GAP_S, abs=0.03)
    assert len(r.itl_s) == 3 and all(g == pytest.approx(GAP_S, abs=0.03) for g in r.itl_s)


def test_e2e_latency_ends_at_the_last_token_chunk():
    r = run()
    assert r.latency_s == pytest.approx(4 * GAP_S, abs=0.03)  # not 4 · GAP + TAIL
