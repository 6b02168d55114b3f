"""Explicit JSON null for an optional field means its default (service/protocol.py StrictModel), as OpenAI (whose
reference types these fields "<type> or null") and vLLM accept: typed SDKs and generic HTTP tooling send unset
optionals as null. Null for a required field, and any other wrong type, is still a 400."""

import httpx
import pytest

from service.protocol import CompletionRequest
from service.protocol_chat import ChatCompletionRequest
from tests.service_fixtures import served  # noqa: F401

COMPLETION_FIELDS = ["echo", "frequency_penalty", "n", "presence_penalty", "stream", "temperature", "top_p",
                     "logprobs", "max_tokens", "seed", "stop", "logit_bias", "user", "top_k", "min_tokens",
                     "ignore_eos", "skip_special_tokens"]
CHAT_FIELDS = ["frequency_penalty", "logprobs", "n", "presence_penalty", "stream", "temperature", "top_p",
               "parallel_tool_calls", "top_logprobs", "tools", "tool_choice", "response_format", "max_tokens",
               "max_completion_tokens", "include_reasoning", "add_generation_prompt"]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=60)


@pytest.mark.parametrize("field", COMPLETION_FIELDS)
def test_completions_take_null_as_the_default(served, field):
    r = post(served, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, field: None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1  # not streamed, one choice: the defaults of stream and n


@pytest.mark.parametrize("field", CHAT_FIELDS)
def test_chat_takes_null_as_the_default(served, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: None}
    if field == "max_tokens":
        body["max_completion_tokens"] = 2
    r = post(served, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_null_in_a_nested_object_means_its_default():
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi", "name": None}],
                                                 "stream": True, "stream_options": {"include_usage": None}})
    assert body.stream_options.include_usage is False


def test_null_values_are_the_field_defaults():
    body = CompletionRequest.model_validate({"prompt": "x", "temperature": None, "top_p": None, "n": None,
                                             "stream": None, "echo": None, "presence_penalty": None})
    assert (body.temperature, body.top_p, body.n, body.stream, body.echo, body.presence_penalty) == \
        (1.0, 1.0, 1, False, False, 0.0)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/chat/completions", {"messages": None}, "messages"),
    ("/v1/completions", {"prompt": "a", "temperature": "1"}, "temperature"),  # still strict for non-null values
    ("/v1/completions", {"prompt": "a", "stream": 0}, "stream"),
])
def test_null_for_a_required_field_and_wrong_types_are_still_400(served, path, body, param):
    r = post(served, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
