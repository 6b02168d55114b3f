"""Chat message shapes a client migrating from vLLM sends, which service/protocol_chat.py read otherwise than vLLM (each failed before its fix); now read as vLLM's
chat_utils does (vllm/entrypoints/chat_utils.py: `_parse_chat_message_content_parts` joins a message's text parts
with "\\n"; MM_PARSER_MAP reads `input_text`, `output_text` and `refusal` parts as text; an assistant message's
`reasoning` is the template's `reasoning_content`). Compared by prompt token ids over HTTP (the parts form against
the string form vLLM renders)."""

import httpx
import pytest

from tests.api_fixtures import api_server  # noqa: F401

USER = {"role": "user", "content": "Question?"}


def prompt_ids(server, messages) -> list[int]:
    response = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers, timeout=60,
                          json={"messages": messages, "max_tokens": 1, "return_token_ids": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["prompt_token_ids"]


def test_text_parts_are_joined_with_newlines(api_server):
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}]
    assert prompt_ids(api_server, [{"role": "user", "content": parts}]) == \
        prompt_ids(api_server, [{"role": "user", "content": "First line.\nSecond line."}])


@pytest.mark.parametrize("part", [{"type": "input_text", "text": "Hi."}, {"type": "output_text", "text": "Hi."},
                                  {"type": "refusal", "refusal": "Hi."}], ids=["input_text", "output_text", "refusal"])
def test_other_text_part_types_are_text(api_server, part):
    assert prompt_ids(api_server, [USER, {"role": "assistant", "content": [part]}, USER]) == \
        prompt_ids(api_server, [USER, {"role": "assistant", "content": "Hi."}, USER])


def test_assistant_reasoning_field_reaches_the_template(api_server):
    thought = [USER, {"role": "assistant", "content": "Yes.", "reasoning": "Think first."}, USER]
    assert prompt_ids(api_server, thought) == prompt_ids(
        api_server, [USER, {"role": "assistant", "content": "Yes.", "reasoning_content": "Think first."}, USER])


def test_assistant_reasoning_and_reasoning_content_that_disagree_are_refused(api_server):
    messages = [USER, {"role": "assistant", "content": "Yes.", "reasoning": "A.", "reasoning_content": "B."}, USER]
    response = httpx.post(api_server.base_url + "/v1/chat/completions", headers=api_server.headers, timeout=60,
                          json={"messages": messages, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.1.reasoning"
