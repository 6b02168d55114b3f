"""Request bodies of the OpenAI-compatible API, as OpenAI and vLLM clients send them (chat: service/protocol_chat.py).

Every field is either honoured or refused: validated strictly (a JSON string where a number belongs,
"max_tokens": "5", is a 400, not a silent coercion), and fields this server cannot honour are listed in
`REFUSED` with the only values it accepts (their defaults); anything else there is a 400 naming the field. Fields
nobody defined are kept by pydantic (`extra="allow"`) so that service/request_fields.py can refuse them with a 400
naming them — or, with --ignore-unknown-fields, accept and ignore them as vLLM does. docs/service.md has the table.
Every list stops at its first bad item (`fail_fast`) and the batch of prompts is capped, so a 1 MiB body of 250,000
bad items costs one error, not 250,000 of them built on the event loop.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.engine.sampling_params import LOGIT_BIAS_LIMIT, MAX_LOGPROBS
from service.errors import bad_request

# Per-request limits (fixed; docs/service.md lists them with the server's flags): they bound the work one request
# puts on the engine thread per generated token (stop checks) and per request (n choices).
MAX_N = 128
MAX_PROMPTS = 2048  # prompts in one batch (prompts x n must also fit the server's capacity)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID_LISTS = 1024  # logit_bias entries, allowed_token_ids, bad_words
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1  # any int64, as vLLM (torch.iinfo(torch.long))

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]


class StrictModel(BaseModel):
    """Strict types; unknown fields are kept aside (model_extra) for service/request_fields.py to refuse.

    An explicit JSON null for a field that has a default means that default: OpenAI types its optional fields
    "<type> or null" (`"temperature": null`, `"stream": null`), vLLM declares them Optional, and typed SDKs send
    unset optionals as null. Only null is let through this way; any other value is validated strictly."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra={"additionalProperties": False})
    _null_means_default: ClassVar[frozenset[str]] = frozenset()  # JSON keys of the fields with a non-null default

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._null_means_default = frozenset(field.alias or name for name, field in cls.model_fields.items()
                                            if not field.is_required() and field.default is not None)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_of_defaulted_fields(cls, data):
        if isinstance(data, dict) and None in data.values():
            return {k: v for k, v in data.items() if v is not None or k not in cls._null_means_default}
        return data


class StreamOptions(StrictModel):
    """As vLLM: `stream_options` present means a final usage chunk unless include_usage is false (or null: vLLM
    types it `bool | None = True`); continuous_usage_stats, with it, puts each choice's usage so far on its chunks."""

    include_usage: bool = True
    continuous_usage_stats: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_include_usage_is_false(cls, data):
        # runs before StrictModel's null -> default, which would make it true
        if isinstance(data, dict) and "include_usage" in data and data["include_usage"] is None:
            return {**data, "include_usage": False}
        return data


class JsonSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_TOKEN_ID_LISTS, fail_fast=True)] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # accepted at their defaults only (REFUSED_STRUCTURED)
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False


def _refused(value, allowed: tuple) -> bool:
    return not any(value == ok and type(value) is type(ok) for ok in allowed)


# field -> (values accepted, why anything else is refused). Values are compared with their type (False != 0).
REFUSED: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1.0, 1), "length_penalty applies to beam search, which is not implemented"),
    "spaces_between_special_tokens": ((True,), "special tokens are always decoded without added spaces"),
    "priority": ((0,), "requests are scheduled first come, first served"),
    "logits_processors": ((None,), "custom logits processors are not supported"),
    "kv_transfer_params": ((None,), "disaggregated prefill is not supported"),
    "vllm_xargs": ((None,), "no extension arguments are defined"),
    "guided_decoding_backend": ((None, "auto", "guidance", "llguidance"),
                                "structured output always uses llguidance"),
    "guided_whitespace_pattern": ((None,), "JSON output is compact (no free whitespace)"),
}
REFUSED_STRUCTURED = {"structural_tag": None, "whitespace_pattern": None, "disable_any_whitespace": False,
                      "disable_fallback": False, "disable_additional_properties": False}


class SamplingRequest(StrictModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="Served model id (see /v1/models); omitted = the served model")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate; completions default 16, chat "
                                                           "default = the rest of the context; 0 only with echo")
    temperature: FiniteFloat = Field(1.0, ge=0.0, description="0 = greedy (so is anything below 1e-5)")
    top_p: FiniteFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0 = off")
    min_p: FiniteFloat = Field(0.0, ge=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(fail_fast=True)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} strings of up to {MAX_STOP_STRING_CHARS} characters")
    stop_token_ids: Annotated[list[TokenId], Field(fail_fast=True)] | None = Field(
        None, description=f"Up to {MAX_STOP_TOKEN_IDS} token ids that end generation")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Any int64; choice i is sampled with seed + i")
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, description="Only equal to n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: FiniteFloat = Field(1.0, gt=0.0, le=100.0)
    logit_bias: dict[str, FiniteFloat] | None = Field(None, description="token id (as a string) -> bias, clamped "
                                                                      f"to [-{LOGIT_BIAS_LIMIT:g}, "
                                                                      f"{LOGIT_BIAS_LIMIT:g}]")
    min_tokens: int = Field(0, ge=0)
    bad_words: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_TOKEN_ID_LISTS,
                                                                          fail_fast=True)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_ID_LISTS * 64,
                                                      fail_fast=True)] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="Keep the last k prompt tokens; -1 = the "
                                                                         "context length")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    request_id: str | None = Field(None, max_length=256, description="Used in the response id")
    cache_salt: str | None = Field(None, max_length=256, description="Only requests with the same salt share "
                                                                    "prefix-cache blocks")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, fail_fast=True)] | None = None
    guided_grammar: str | None = None
    # accepted at the values REFUSED lists only
    use_beam_search: bool = False
    length_penalty: FiniteFloat = 1.0
    spaces_between_special_tokens: bool = True
    priority: int = 0
    logits_processors: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

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

    def continuous_usage_in_stream(self) -> bool:
        """vLLM's continuous_usage_stats: only together with include_usage (alone it adds nothing)."""
        return self.include_usage_in_stream() and self.stream_options.continuous_usage_stats

    def logit_bias_ids(self) -> dict[int, float]:
        out = {}
        for key, value in (self.logit_bias or {}).items():
            # ASCII digits only: str.isdigit() also takes "²", which int() refuses (a 500)
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise bad_request(f"logit_bias keys are token ids, got {key!r}", f"logit_bias.{key}")
            out[int(key)] = value
        return out

    def check_supported(self) -> None:
        """Field combinations, limits and refused values pydantic does not check; called before any other work."""
        self.stop_strings()
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad_request(f"At most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if self.logit_bias is not None and len(self.logit_bias) > MAX_TOKEN_ID_LISTS:
            raise bad_request(f"At most {MAX_TOKEN_ID_LISTS} logit_bias entries are allowed", "logit_bias")
        self.logit_bias_ids()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", "best_of", "unsupported")
        if self.truncate_prompt_tokens == 0:
            raise bad_request("truncate_prompt_tokens must be >= 1, or -1 for the context length",
                              "truncate_prompt_tokens")
        for name, (allowed, why) in REFUSED.items():
            if _refused(getattr(self, name), allowed):
                raise bad_request(f"{name} is not supported by this server ({why})", name, "unsupported")
        if self.structured_outputs is not None:
            for name, default in REFUSED_STRUCTURED.items():
                if getattr(self.structured_outputs, name) != default:
                    raise bad_request(f"structured_outputs.{name} is not supported by this server",
                                      f"structured_outputs.{name}", "unsupported")


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)] = Field(
            ..., description=f"Text, token ids, or a batch of up to {MAX_PROMPTS} of either")
    echo: bool = Field(False, description="Prepend the prompt (and, with logprobs, its logprobs) to each choice")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token (0 = only the "
                                                                          "chosen token's logprob)")
    add_special_tokens: bool = Field(True, description="Let the tokenizer add its special tokens (BOS) to text")
    suffix: str | None = None
    prompt_embeds: Any = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by this server", "suffix", "unsupported")
        if self.prompt_embeds is not None:
            raise bad_request("prompt_embeds are not supported by this server", "prompt_embeds", "unsupported")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or one token list per entry."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


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


def new_id(prefix: str, request_id: str | None = None) -> str:
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
