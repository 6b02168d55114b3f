"""The /v1/chat/completions request: messages (with tool calls and tool results), tools and tool_choice, the chat
template's knobs, and the OpenAI chat fields this server refuses (see service/protocol.py for the rules)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from model.engine.sampling_params import MAX_LOGPROBS
from service.errors import bad_request
from service.protocol import SamplingRequest, StrictModel

MAX_TOOLS = 128


class ContentPart(StrictModel):
    type: str
    text: str | None = None
    refusal: str | None = None  # a "refusal" part's text

    def plain_text(self) -> str | None:
        """The part's text when it is a text part (vLLM reads input_text / output_text / refusal parts as text)."""
        field = TEXT_PART_FIELDS.get(self.type)
        return getattr(self, field) if field else None


TEXT_PART_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}


class FunctionCall(StrictModel):
    name: str
    arguments: str = Field(..., description="JSON text of the arguments")


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool results
    reasoning_content: str | None = None  # an assistant turn's thinking, for templates that show it
    reasoning: str | None = None  # the same under vLLM's newer name (its responses carry `reasoning`)
    refusal: str | None = None

    def check_content(self, i: int) -> None:
        """Only an assistant turn may leave content out (it may carry tool_calls instead), as in OpenAI's API."""
        if self.content is None and self.role != "assistant":
            raise bad_request(f"Missing required field 'messages.{i}.content' ({self.role} messages need content)",
                              f"messages.{i}.content", "missing_field")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.plain_text() or "" for part in self.content)  # vLLM joins text parts with "\n"

    def thinking(self) -> str | None:
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


# field -> (values accepted, why anything else is refused)
CHAT_REFUSED: dict[str, tuple[tuple, str]] = {
    "echo": ((False,), "echoing the last message is not supported"),
    "continue_final_message": ((False,), "continuing the final message is not supported"),
    "chat_template": ((None,), "per-request chat templates are not accepted (the server's --chat-template is)"),
    "documents": ((None,), "documents (RAG templates) are not supported"),
    "mm_processor_kwargs": ((None,), "this server serves text-only models"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "audio": ((None,), "this server serves text-only models"),
    "web_search_options": ((None,), "web search is not available"),
    "functions": ((None,), "use tools instead of the deprecated functions"),
    "function_call": ((None,), "use tool_choice instead of the deprecated function_call"),
    "verbosity": ((None,), "verbosity is not supported"),
    "store": ((None, False), "completions are not stored"),
    "add_special_tokens": ((False,), "the chat template writes the special tokens"),
}


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(fail_fast=True)] = Field(..., description="At least one message")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer OpenAI name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict | None = Field(None, description="Variables for the chat template "
                                                                "(enable_thinking for Qwen3, ...)")
    add_generation_prompt: bool = True
    include_reasoning: bool = Field(True, description="With --reasoning-parser: false drops reasoning_content")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="The chat template's `reasoning_effort` variable (gpt-oss's template reads it)")
    modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = None
    metadata: dict | None = Field(None, description="Accepted; not stored")
    service_tier: str | None = Field(None, description="Accepted; one tier")
    prompt_cache_key: str | None = Field(None, description="Accepted; no effect on the output")
    safety_identifier: str | None = Field(None, description="Accepted; no effect on the output")
    # accepted at the values CHAT_REFUSED lists only
    echo: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    documents: Any = None
    mm_processor_kwargs: Any = None
    prediction: Any = None
    audio: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    verbosity: Any = None
    store: bool | None = None
    add_special_tokens: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages must contain at least one message", "messages", "empty_messages")
        for name, (allowed, why) in CHAT_REFUSED.items():
            value = getattr(self, name)
            if not any(value == ok and type(value) is type(ok) for ok in allowed):
                raise bad_request(f"{name} is not supported by this server ({why})", name, "unsupported")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.max_tokens == 0:
            raise bad_request("max_tokens must be >= 1", "max_tokens")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_tokens and max_completion_tokens disagree", "max_completion_tokens")
        for i, message in enumerate(self.messages):
            message.check_content(i)
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.plain_text() is None:
                    raise bad_request(f"content parts of type {part.type!r} are not supported (text only: "
                                      f"{', '.join(TEXT_PART_FIELDS)}, with their text)",
                                      f"messages.{i}.content.{j}.type", "unsupported")
            if None not in (message.reasoning, message.reasoning_content) \
                    and message.reasoning != message.reasoning_content:
                raise bad_request("reasoning and reasoning_content disagree; give one", f"messages.{i}.reasoning")
            if message.tool_calls and message.role != "assistant":
                raise bad_request("only assistant messages carry tool_calls", f"messages.{i}.tool_calls")
            for j, call in enumerate(message.tool_calls or []):
                try:
                    json.loads(call.function.arguments)
                except ValueError:
                    raise bad_request("tool call arguments must be JSON text",
                                      f"messages.{i}.tool_calls.{j}.function.arguments") from None
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise bad_request("tool names must be unique", "tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise bad_request(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                              "tool_choice.function.name")
        if self.tool_choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        given = (self.chat_template_kwargs or {}).get("reasoning_effort", self.reasoning_effort)
        if self.reasoning_effort is not None and given != self.reasoning_effort:  # neither may silently win
            raise bad_request(f"reasoning_effort ({self.reasoning_effort!r}) and chat_template_kwargs.reasoning_effort "
                              f"({given!r}) disagree; give one", "reasoning_effort")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_kwargs(self) -> dict:
        """chat_template_kwargs, plus reasoning_effort as the template variable of that name (as vLLM passes it)."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        return kwargs

    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def message_dicts(self) -> list[dict]:
        return message_dicts(self.messages)

    def tool_dicts(self) -> list[dict] | None:
        """Tools for the template; rendered with tool_choice 'none' too (as vLLM), whose output is never parsed."""
        if not self.tools:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as chat templates read them (transformers' convention): tool-call arguments as objects."""
    out = []
    for m in messages:
        d: dict = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.thinking() is not None:
            d["reasoning_content"] = m.thinking()
        out.append(d)
    return out
