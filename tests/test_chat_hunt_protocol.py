"""Chat message shapes a client migrating from vLLM sends, which service/protocol_chat.py (not owned by the chat
hunt) reads otherwise than vLLM. Each is a strict xfail: it passes once the protocol reads the messages as vLLM's
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


@pytest.mark.xfail(strict=True, reason="protocol_chat.ChatMessage.text joins text parts with '' (vLLM: '\\n'), so "
                                       "a parts message renders 'AB' where vLLM renders 'A\\nB'")
def test_text_parts_are_joined_with_newlines(api_server):
    parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}]
    assert prompt_ids(api_server, [{"role": "user", "content": parts}]) == \
        prompt_ids(api_server, [{"role": "user", "content": "First line.\nSecond line."}])


@pytest.mark.xfail(strict=True, reason="protocol_chat refuses text part types other than 'text' (400 unsupported); "
                                       "vLLM reads input_text, output_text and refusal parts as text")
@pytest.mark.parametrize("part", [{"type": "input_text", "text": "Hi."}, {"type": "output_text", "text": "Hi."},
                                  {"type": "refusal", "refusal": "Hi."}], ids=["input_text", "output_text", "refusal"])
def test_other_text_part_types_are_text(api_server, part):
    assert prompt_ids(api_server, [USER, {"role": "assistant", "content": [part]}, USER]) == \
        prompt_ids(api_server, [USER, {"role": "assistant", "content": "Hi."}, USER])


@pytest.mark.xfail(strict=True, reason="protocol_chat.ChatMessage has no `reasoning` field (400 unknown_field); "
                                       "vLLM reads an assistant message's `reasoning` (its responses' field name) "
                                       "and hands it to the template as reasoning_content")
def test_assistant_reasoning_field_reaches_the_template(api_server):
    thought = [USER, {"role": "assistant", "content": "Yes.", "reasoning": "Think first."}, USER]
    assert prompt_ids(api_server, thought) == prompt_ids(
        api_server, [USER, {"role": "assistant", "content": "Yes.", "reasoning_content": "Think first."}, USER])
