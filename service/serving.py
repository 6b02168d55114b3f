"""What /v1/completions and /v1/chat/completions share (service/serving_completions.py, service/serving_chat.py):
request checks, capacity, tokenizer threads, submission, and delivery as one JSON body or an SSE stream.

Choice index = prompt_index * n + i (OpenAI's batch convention). Choice i of a seeded request samples with
seed + i, so the n choices differ yet the whole response is reproducible.

Order of work, cheapest refusal first: field checks and limits, unknown fields, "is the engine taking requests",
"does the request fit the server's capacity" (prompts x n), and only then tokenization and grammar compilation (on
the tokenizer threads) and admission.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from model.engine import SamplingParams
from service.engine_client import EngineClient
from service.engine_interface import ServingEngine
from service.errors import ApiError, bad_request, error_body
from service.protocol import SamplingRequest
from service.request_fields import check_unknown_fields
from service.request_group import RequestGroup

logger = logging.getLogger("staticmoe.service")
TOKENIZER_THREADS = 2


@dataclass
class ServingOptions:
    served_model_name: str
    parse_special_tokens_in_content: bool = False
    ignore_unknown_fields: bool = False  # vLLM's behaviour: accept and ignore (logged) instead of 400
    tool_call_parser: str | None = "hermes"  # None: tools are refused
    reasoning_parser: str | None = None  # e.g. "qwen3": <think> text -> reasoning_content


class EventStreamResponse(StreamingResponse):
    """SSE response that always listens for the client going away (whatever ASGI spec version the server
    announces), so the generator is cancelled and its `finally` aborts the engine requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:
                async def stream_then_stop():
                    await self.stream_response(send)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            # cancelled while awaiting `send`, the generator sits at a yield: close it now, not at GC time
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def has_content(output) -> bool:
    """One chunk per engine output that carries new tokens (as vLLM), even when their text is empty so far (a partial
    UTF-8 character, or text held back while it may start a stop string): clients time tokens by chunks. Outputs
    with no token (an abort) still send their finish_reason."""
    return bool(output.new_token_ids) or bool(output.new_text) or output.finished


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class Usage:
    """Token counts of the n·prompts engine requests of one HTTP request (choice index = prompt_index * n + i)."""

    def __init__(self, count: int, prompt_lens: list[int]):
        self.output_tokens = [0] * count
        self.prompt_lens = list(prompt_lens)
        self.n = count // max(1, len(prompt_lens))
        self.prompt_tokens = sum(prompt_lens)  # each prompt once, whatever n (as OpenAI and vLLM count)

    def add(self, index: int, output, hidden: int = 0) -> None:
        self.output_tokens[index] = max(0, output.num_output_tokens - hidden)

    def as_dict(self) -> dict:
        return _usage(self.prompt_tokens, sum(self.output_tokens))

    def choice_dict(self, index: int) -> dict:
        """One choice's usage so far: its own prompt and its own tokens (vLLM's continuous_usage_stats)."""
        return _usage(self.prompt_lens[index // self.n], self.output_tokens[index])


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream_chunk(body, usage: Usage, request_id: str, object_name: str, created: int, model: str,
                 choice_list: list[dict], with_usage: bool = False) -> dict:
    """One streamed chunk of either endpoint. With include_usage, `usage` is null but on the last chunk
    (`with_usage`: the request's totals); with continuous_usage_stats too, a chunk of one choice carries that
    choice's usage so far, as vLLM: its prompt's tokens and its own completion tokens (0 on chat's opening role
    chunks), not the request's."""
    out = {"id": request_id, "object": object_name, "created": created, "model": model, "choices": choice_list}
    if body.include_usage_in_stream():
        if with_usage:
            out["usage"] = usage.as_dict()
        elif body.continuous_usage_in_stream() and len(choice_list) == 1:
            out["usage"] = usage.choice_dict(choice_list[0]["index"])
        else:
            out["usage"] = None
    return out


class OpenAIServing:
    def __init__(self, client: EngineClient, options: ServingOptions):
        self.client = client
        self.options = options
        self.served_model_name = options.served_model_name
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS,
                                                                    thread_name_prefix="staticmoe-tokenize")

    # ---- shared request preparation -------------------------------------------------------------------------------
    def check_request(self, body: SamplingRequest) -> None:
        body.check_supported()
        check_unknown_fields(body, self.options.ignore_unknown_fields)
        self._check_model(body)

    def _check_model(self, body: SamplingRequest) -> None:
        if body.model is not None and body.model != self.served_model_name:
            raise ApiError(400, f"The model '{body.model}' does not exist; this server serves "
                                f"'{self.served_model_name}'", param="model", code="model_not_found")

    def engine_for(self, num_prompts: int, n: int) -> ServingEngine:
        """The engine, once it takes requests and this one fits the server (both checked before any work)."""
        self.client.check_accepting()
        engine = self.client.engine
        if engine is None:
            raise ApiError(503, "The model is still loading; retry shortly", code="model_loading")
        self._check_request_size(num_prompts, n)
        return engine

    def _check_request_size(self, num_prompts: int, n: int) -> None:
        """400 when the request alone needs more sequences than the server ever admits."""
        capacity = self.client.capacity
        if num_prompts * n <= capacity:
            return
        if num_prompts > capacity or n == 1:
            raise bad_request(f"The batch of {num_prompts} prompts exceeds this server's capacity of {capacity} "
                              f"concurrent sequences", "prompt")
        if num_prompts == 1:
            raise bad_request(f"n={n} exceeds this server's capacity of {capacity} concurrent sequences", "n")
        raise bad_request(f"{num_prompts} prompts x n={n} = {num_prompts * n} sequences exceed this server's "
                          f"capacity of {capacity} concurrent sequences", "n")

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    @staticmethod
    def resolve_max_tokens(requested: int | None, default: int | None, prompt_lens: list[int], context: int,
                           param: str) -> int:
        longest = max(prompt_lens)
        if longest >= context:
            raise bad_request(f"This model's maximum context length is {context} tokens. However, your prompt has "
                              f"{longest} tokens, which leaves no room for a completion.", "prompt",
                              "context_length_exceeded")
        max_tokens = requested if requested is not None else (default or context - longest)
        if longest + max_tokens > context:
            if requested is None:  # a default never overflows: shrink it to what is left
                return context - longest
            raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                              f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                              f"completion). Please reduce the length of the prompt or max_tokens.", param,
                              "context_length_exceeded")
        return max_tokens

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestGroup:
        expanded_prompts = [p for p in prompts for _ in params]
        expanded_params = [sp for _ in prompts for sp in params]
        # every prompt id was checked at the boundary: token lists by the request model (ints >= 0) and
        # completion_prompt_ids (< vocab), text through the tokenizer, whose ids the loader keeps within the vocabulary
        return await self.client.generate(expanded_prompts, expanded_params, prompts_checked=True)

    # ---- delivery -------------------------------------------------------------------------------------------------
    async def collect(self, group: RequestGroup, on_output: Callable, request: Request) -> None:
        """Feed every output to `on_output(index, output)`; if the client disconnects first, abort the group."""
        async def consume():
            async for index, output in group:
                on_output(index, output)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
            group.abort()  # also after a consumer that raised (a formatter bug: the 500 must free the sequences)
            # let both finish cancelling: asking a task for its result before that raises InvalidStateError
            await asyncio.wait({consumer, watcher})
        if consumer.cancelled():
            raise ApiError(499, "client disconnected", code="client_closed")
        consumer.result()  # re-raises an engine failure

    async def stream(self, group: RequestGroup, on_output: Callable, first_chunks: Callable | None,
                     final_chunks: Callable) -> AsyncIterator[str]:
        """SSE: `first_chunks()`, then the chunks `on_output(index, output)` returns (a list), then
        `final_chunks()`, then [DONE]; an engine failure mid-stream is reported in-band."""
        try:
            if first_chunks is not None:
                for c in first_chunks():
                    yield sse(c)
            async for index, output in group:
                for c in on_output(index, output):
                    yield sse(c)
            for c in final_chunks():
                yield sse(c)
        except ApiError as err:  # failure mid-stream: the status line is gone, so report in-band (the body and
            # type the same failure gets without streaming)
            yield sse(error_body(err.status, err.message, err.param, err.code))
        except Exception as err:  # noqa: BLE001 — a bug while formatting: in-band too, as the 500 it would be
            logger.exception("stream failed")
            yield sse(error_body(500, f"Internal server error: {type(err).__name__}", code="internal_error"))
        finally:
            group.abort()  # no-op when every choice finished; frees KV blocks when the client left early
        yield sse("[DONE]")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
