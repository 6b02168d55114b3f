"""/v1/completions and /v1/chat/completions: request → engine requests → JSON body or SSE stream.

Choice index = prompt_index * n + i (OpenAI's batch convention). Choice i of a seeded request samples with
seed + i, so the n choices differ yet the whole response is reproducible.

Order of work, cheapest refusal first: field checks and limits, "is the engine taking requests", "does the request
fit the server's capacity" (prompts x n), and only then tokenization (on the tokenizer threads) and admission.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from typing import AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model.engine import SamplingParams
from service.engine_client import EngineClient
from service.engine_interface import ServingEngine
from service.errors import ApiError, bad_request
from service.prompts import chat_prompt_ids, completion_prompt_ids
from service.protocol import (SEED_MAX, ChatCompletionRequest, CompletionRequest, SamplingRequest, new_id, now)
from service.request_group import RequestGroup

COMPLETION_DEFAULT_MAX_TOKENS = 16
TOKENIZER_THREADS = 2


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


class Choices:
    """Accumulates the outputs of the n·prompts engine requests of one HTTP request."""

    def __init__(self, count: int, prompt_lens: list[int], n: int):
        self.text = [""] * count
        self.finish_reason: list[str | None] = [None] * count
        self.stop_reason: list = [None] * count
        self.output_tokens = [0] * count
        self.prompt_tokens = sum(prompt_lens) * n  # every choice re-reads its prompt (as vLLM and OpenAI count)

    def add(self, index: int, output) -> None:
        self.text[index] += output.new_text
        self.output_tokens[index] = output.num_output_tokens
        if output.finished:
            self.finish_reason[index] = output.finish_reason
            self.stop_reason[index] = output.stop_reason

    def usage(self) -> dict:
        completion = sum(self.output_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class OpenAIServing:
    def __init__(self, client: EngineClient, served_model_name: str, parse_special_tokens_in_content: bool = False):
        self.client = client
        self.served_model_name = served_model_name
        self.parse_special_tokens_in_content = parse_special_tokens_in_content
        self.tokenizer_pool = concurrent.futures.ThreadPoolExecutor(TOKENIZER_THREADS,
                                                                    thread_name_prefix="staticmoe-tokenize")

    # ---- shared request preparation -------------------------------------------------------------------------------
    def _check_model(self, body: SamplingRequest) -> None:
        if body.model is not None and body.model != self.served_model_name:
            raise ApiError(400, f"The model '{body.model}' does not exist; this server serves "
                                f"'{self.served_model_name}'", param="model", code="model_not_found")

    def _engine(self, num_prompts: int, n: int) -> ServingEngine:
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

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    def _sampling_params(self, body: SamplingRequest, max_tokens: int) -> list[SamplingParams]:
        stops = body.stop_strings()
        params = []
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + i) % (SEED_MAX + 1)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                         top_k=body.top_k, seed=seed, stop=stops,
                                         stop_token_ids=list(body.stop_token_ids or []),
                                         ignore_eos=body.ignore_eos))
        return params

    def _resolve_max_tokens(self, requested: int | None, default: int | None, prompt_lens: list[int],
                            context: int, param: str) -> int:
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

    async def _submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> RequestGroup:
        expanded_prompts = [p for p in prompts for _ in params]
        expanded_params = [sp for _ in prompts for sp in params]
        return await self.client.generate(expanded_prompts, expanded_params)

    # ---- /v1/completions ------------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        self._check_model(body)
        texts = body.prompts()
        engine = self._engine(len(texts), body.n)
        prompts = await self._off_loop(completion_prompt_ids, engine.tokenizer, int(engine.model_config.vocab_size),
                                       texts)
        prompt_lens = [len(p) for p in prompts]
        max_tokens = self._resolve_max_tokens(body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, prompt_lens,
                                              engine.max_model_len, "max_tokens")
        group = await self._submit(prompts, self._sampling_params(body, max_tokens))
        choices = Choices(len(prompts) * body.n, prompt_lens, body.n)
        request_id, created = new_id("cmpl"), now()

        def chunk(choices_list: list[dict], usage=None) -> dict:
            out = {"id": request_id, "object": "text_completion", "created": created,
                   "model": self.served_model_name, "choices": choices_list}
            if body.include_usage_in_stream():
                out["usage"] = usage
            return out

        if body.stream:
            def on_output(index, output):
                if not has_content(output):
                    return None
                return chunk([{"index": index, "text": output.new_text, "logprobs": None,
                               "finish_reason": output.finish_reason if output.finished else None,
                               "stop_reason": output.stop_reason if output.finished else None}])

            return EventStreamResponse(self._stream(group, choices, on_output, None,
                                                    lambda: chunk([], choices.usage()) if
                                                    body.include_usage_in_stream() else None))
        await self._collect(group, choices, request)
        return JSONResponse({
            "id": request_id, "object": "text_completion", "created": created, "model": self.served_model_name,
            "choices": [{"index": i, "text": choices.text[i], "logprobs": None,
                         "finish_reason": choices.finish_reason[i], "stop_reason": choices.stop_reason[i]}
                        for i in range(len(choices.text))],
            "usage": choices.usage()})

    # ---- /v1/chat/completions -------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        self._check_model(body)
        engine = self._engine(1, body.n)
        prompt = await self._off_loop(chat_prompt_ids, engine.tokenizer, body.message_dicts(),
                                      self.parse_special_tokens_in_content)
        max_tokens = self._resolve_max_tokens(body.requested_max_tokens(), None, [len(prompt)],
                                              engine.max_model_len, "max_tokens")
        group = await self._submit([prompt], self._sampling_params(body, max_tokens))
        choices = Choices(body.n, [len(prompt)], body.n)
        request_id, created = new_id("chatcmpl"), now()

        def chunk(choices_list: list[dict], usage=None) -> dict:
            out = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                   "model": self.served_model_name, "choices": choices_list}
            if body.include_usage_in_stream():
                out["usage"] = usage
            return out

        if body.stream:
            def first_chunks():
                return [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for i in range(body.n)]

            def on_output(index, output):
                if not has_content(output):
                    return None
                delta = {"content": output.new_text} if output.new_token_ids or output.new_text else {}
                return chunk([{"index": index, "delta": delta, "logprobs": None,
                               "finish_reason": output.finish_reason if output.finished else None,
                               "stop_reason": output.stop_reason if output.finished else None}])

            return EventStreamResponse(self._stream(group, choices, on_output, first_chunks,
                                                    lambda: chunk([], choices.usage()) if
                                                    body.include_usage_in_stream() else None))
        await self._collect(group, choices, request)
        return JSONResponse({
            "id": request_id, "object": "chat.completion", "created": created, "model": self.served_model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": choices.text[i]},
                         "logprobs": None, "finish_reason": choices.finish_reason[i],
                         "stop_reason": choices.stop_reason[i]} for i in range(body.n)],
            "usage": choices.usage()})

    # ---- delivery -------------------------------------------------------------------------------------------------
    async def _collect(self, group: RequestGroup, choices: Choices, request: Request) -> None:
        """Wait for every choice; if the client disconnects first, abort the engine requests."""
        async def consume():
            async for index, output in group:
                choices.add(index, output)

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not consumer.done():
                consumer.cancel()
                group.abort()
            # let both finish cancelling: asking a task for its result before that raises InvalidStateError
            await asyncio.wait({consumer, watcher})
        if consumer.cancelled():
            raise ApiError(499, "client disconnected", code="client_closed")
        consumer.result()  # re-raises an engine failure

    async def _stream(self, group: RequestGroup, choices: Choices, on_output: Callable,
                      first_chunks: Callable | None, usage_chunk: Callable) -> AsyncIterator[str]:
        try:
            if first_chunks is not None:
                for c in first_chunks():
                    yield sse(c)
            async for index, output in group:
                choices.add(index, output)
                c = on_output(index, output)
                if c is not None:
                    yield sse(c)
            final = usage_chunk()
            if final is not None:
                yield sse(final)
        except ApiError as err:  # engine failure mid-stream: the status line is gone, so report in-band
            yield sse({"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}})
        finally:
            group.abort()  # no-op when every choice finished; frees KV blocks when the client left early
        yield sse("[DONE]")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
