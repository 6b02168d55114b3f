"""Request and response bodies of the OpenAI-compatible API, as OpenAI and vLLM clients send and expect them.

Requests are validated strictly: a JSON string where a number belongs ("max_tokens": "5") is a 400, not a silent
coercion. Unknown fields are ignored (clients send many optional fields); known-but-unsupported features with a
non-default value (logprobs, penalties, tools, echo) are rejected by `check_supported` with a clear message.
Every list stops at its first bad item (`fail_fast`) and the batch of prompts is capped, so a 1 MiB body of 250,000
bad items costs one error, not 250,000 of them built on the event loop.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import bad_request

# Per-request limits (fixed; docs/service.md lists them with the server's flags): they bound the work one request
# puts on the engine thread per generated token (stop checks) and per request (n choices).
MAX_N = 128
MAX_PROMPTS = 2048  # prompts in one batch (prompts x n must also fit the server's capacity)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
SEED_MAX = 2**63 - 1
ONLY_DEFAULT = {"minimum": 0, "maximum": 0}

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, fail_fast=True)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="Served model id (see /v1/models); omitted = the served model")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate; completions default 16, "
                                                           "chat default = the rest of the context")
    temperature: FiniteFloat = Field(1.0, ge=0.0, description="0 = greedy (so is anything below 1e-5)")
    top_p: FiniteFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = off")
    stop: str | Annotated[list[str], Field(fail_fast=True)] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings of up to "
                                                           f"{MAX_STOP_STRING_CHARS} characters that end generation")
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(fail_fast=True)] | None = Field(
        None, description=f"Up to {MAX_STOP_TOKEN_IDS} token ids that end generation")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Choice i is sampled with seed + i")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    # Accepted for compatibility, only at their defaults (the schema says so; check_supported explains why not)
    presence_penalty: FiniteFloat = Field(0.0, json_schema_extra=ONLY_DEFAULT)
    frequency_penalty: FiniteFloat = Field(0.0, json_schema_extra=ONLY_DEFAULT)
    logit_bias: dict | None = Field(None, json_schema_extra={"maxProperties": 0})

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
        if any(s == "" for s in stops):
            raise bad_request("Stop strings must not be empty", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise bad_request(f"Stop strings may have at most {MAX_STOP_STRING_CHARS} characters", "stop")
        return stops

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Field combinations and limits pydantic does not check; called before any other work."""
        self.stop_strings()
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"At most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise bad_request(f"{name} is not supported by this server (use 0)", name, "unsupported")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias", "unsupported")


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)] = Field(
            ..., description=f"Text, token ids, or a batch of up to {MAX_PROMPTS} of either")
    echo: bool = Field(False, json_schema_extra={"enum": [False]})
    logprobs: int | None = Field(None, json_schema_extra=lambda schema: schema.update(anyOf=[{"type": "null"}]))
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, ge=1)

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported by this server", "echo", "unsupported")
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported by this server", "logprobs", "unsupported")
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix", "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of", "unsupported")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or one token list per entry."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(fail_fast=True)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] = Field(..., description="At least one message")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer OpenAI name of max_tokens")
    logprobs: bool = Field(False, json_schema_extra={"enum": [False]})
    top_logprobs: int | None = Field(None, json_schema_extra=lambda schema: schema.update(anyOf=[{"type": "null"}]))
    tools: list | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages must contain at least one message", "messages", "empty_messages")
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs is not supported by this server", "logprobs", "unsupported")
        if self.tools:
            raise bad_request("tools are not supported by this server", "tools", "unsupported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format type 'text' is supported", "response_format", "unsupported")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree", "max_completion_tokens")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in self.messages]


# ---- responses -------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None
    stop_reason: str | int | None = Field(None, description="The stop string or token id that ended the choice")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "staticmoe"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
