"""vLLM's utility routes: POST /tokenize (a prompt, or chat messages through the chat template), POST /detokenize,
GET /version. Same checks as the API routes (unknown fields, model id, tokenizer threads); /tokenize and
/detokenize need the API key like /v1/* when one is set."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field

from service.errors import bad_request
from service.logprobs_format import TokenTexts
from service.prompts import chat_prompt_ids, completion_prompt_ids
from service.protocol import StrictModel, TokenId
from service.protocol_chat import CHAT_REFUSED, ChatMessage, Tool, message_dicts
from service.protocol_responses import DetokenizeResponse, TokenizeResponse, VersionResponse
from service.request_fields import check_unknown_fields
from service.serving import OpenAIServing
from service.version import package_version

MAX_DETOKENIZE = 1 << 17


class TokenizeCompletionRequest(StrictModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(StrictModel):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]
    add_generation_prompt: bool = True
    tools: Annotated[list[Tool], Field(fail_fast=True)] | None = None
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False
    # vLLM's TokenizeChatRequest has these too: accepted at the values /v1/chat/completions accepts (CHAT_REFUSED)
    add_special_tokens: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    mm_processor_kwargs: Any = None

    def check_supported(self) -> None:
        for name in ("add_special_tokens", "continue_final_message", "chat_template", "mm_processor_kwargs"):
            allowed, why = CHAT_REFUSED[name]
            value = getattr(self, name)
            if not any(value == ok and type(value) is type(ok) for ok in allowed):
                raise bad_request(f"{name} is not supported by this server ({why})", name, "unsupported")


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_DETOKENIZE, fail_fast=True)]


def tokenize_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    def check(body) -> None:
        if isinstance(body, TokenizeChatRequest):
            body.check_supported()
        check_unknown_fields(body, serving.options.ignore_unknown_fields)
        serving._check_model(body)

    @router.post("/tokenize", response_model=TokenizeResponse, summary="Token ids of a prompt or of chat messages")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest):
        check(body)
        for i, message in enumerate(getattr(body, "messages", ())):
            message.check_content(i)
        engine = serving.engine_for(1, 1)
        vocab = int(engine.model_config.vocab_size)

        def run():
            if isinstance(body, TokenizeCompletionRequest):
                return engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            try:
                messages = message_dicts(body.messages)
            except ValueError:
                raise bad_request("tool call arguments must be JSON text", "messages") from None
            return chat_prompt_ids(engine.tokenizer, messages,
                                   serving.options.parse_special_tokens_in_content, tools,
                                   body.add_generation_prompt, body.chat_template_kwargs)

        tokens = await serving.off_loop(run)
        if isinstance(body, TokenizeCompletionRequest) and tokens:
            completion_prompt_ids(engine.tokenizer, vocab, [tokens])  # the ids the model would accept
        out = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            texts = TokenTexts(engine.tokenizer)
            out["token_strs"] = [texts.text(t) for t in tokens]
        return out

    @router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids")
    async def detokenize(body: DetokenizeRequest):
        check(body)
        engine = serving.engine_for(1, 1)
        vocab = int(engine.model_config.vocab_size)
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is outside the vocabulary (size {vocab})", "tokens",
                              "invalid_token_id")
        return {"prompt": await serving.off_loop(engine.tokenizer.decode, body.tokens)}

    @router.get("/version", response_model=VersionResponse, summary="The server's version")
    async def version():
        return {"version": package_version()}

    return router
