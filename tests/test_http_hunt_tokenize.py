"""/tokenize with chat messages, as vLLM's TokenizeChatRequest defines it (vllm/entrypoints/openai/protocol.py):
besides messages, tools, add_generation_prompt, chat_template_kwargs and return_token_strs it has
add_special_tokens (default false), continue_final_message (default false), chat_template and mm_processor_kwargs.
A vLLM client that sends them at their defaults (`"add_special_tokens": false` is common, it mirrors the chat
request) got a 400 unknown_field here; other values are refused as /v1/chat/completions refuses them."""

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import ServerProcess  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]

MESSAGES = [{"role": "user", "content": "hi"}]


def tokenize(server: ServerProcess, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/tokenize", json=body, headers=server.headers, timeout=30)


@pytest.mark.parametrize("extra", [{"add_special_tokens": False}, {"continue_final_message": False},
                                   {"chat_template": None}, {"mm_processor_kwargs": None}])
def test_vllm_chat_fields_at_their_defaults_are_accepted(served, extra):
    plain = tokenize(served, {"messages": MESSAGES})
    assert plain.status_code == 200, plain.text
    response = tokenize(served, {"messages": MESSAGES, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == plain.json()["tokens"]


@pytest.mark.parametrize("field,value", [("add_special_tokens", True), ("continue_final_message", True),
                                         ("chat_template", "{{ messages }}"), ("mm_processor_kwargs", {"a": 1})])
def test_other_values_are_refused_as_the_chat_endpoint_refuses_them(served, field, value):
    response = tokenize(served, {"messages": MESSAGES, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported", error
    chat = httpx.post(served.base_url + "/v1/chat/completions", headers=served.headers, timeout=30,
                      json={"messages": MESSAGES, "max_tokens": 1, field: value})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "unsupported"  # the same refusal


def test_a_prompt_request_still_refuses_chat_only_fields(served):
    response = tokenize(served, {"prompt": "hi", "continue_final_message": False})
    assert response.status_code == 400, response.text
