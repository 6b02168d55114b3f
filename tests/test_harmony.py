"""gpt-oss's harmony output (`--reasoning-parser harmony`, `--tool-call-parser harmony`): the reasoning parser, then
the tool parser, as the chat endpoint chains them, on texts written by hand in OpenAI's published format, whole and
streamed in every split (two pieces at every cut, and one character at a time)."""

import pytest

from service.reasoning import get_reasoning_parser
from service.tool_parsers import get_tool_parser

ANALYSIS = "<|channel|>analysis<|message|>User wants weather. Use tool.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris", "unit": "C"}<|call|>')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is 18 C in Paris.<|return|>"

CASES = [  # (output text, reasoning, content, calls)
    (ANALYSIS + FINAL, "User wants weather. Use tool.", "It is 18 C in Paris.", []),
    (ANALYSIS + CALL, "User wants weather. Use tool.", None, [("get_weather", {"city": "Paris", "unit": "C"})]),
    # the recipient in the role part of the header, a plain "json" content type
    ('<|channel|>analysis<|message|>add<|end|><|start|>assistant to=functions.add<|channel|>commentary json'
     '<|message|>{"a": 1, "b": 2}<|call|>', "add", None, [("add", {"a": 1, "b": 2})]),
    # the form of OpenAI's harmony renderer tests: recipient after the role, "commentary <|constrain|>json"
    ("<|channel|>analysis<|message|>Use the weather tool.<|end|><|start|>assistant to=functions.lookup_weather"
     '<|channel|>commentary <|constrain|>json<|message|>{"location": "San Francisco"}<|call|>',
     "Use the weather tool.", None, [("lookup_weather", {"location": "San Francisco"})]),
    # a preamble to the user on the commentary channel, then a call
    ("<|channel|>commentary<|message|>Checking.<|end|>" + CALL, None, "Checking.",
     [("get_weather", {"city": "Paris", "unit": "C"})]),
    ("plain text, no harmony", None, "plain text, no harmony", []),
    # cut off inside the call's arguments (max_tokens): no call, the text stays visible as content
    (ANALYSIS + CALL[:-20], "User wants weather. Use tool.",
     "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + CALL[:-20].split("<|message|>")[1],
     []),
    # arguments that are not a JSON object stay content
    ("<|channel|>commentary to=functions.add <|constrain|>json<|message|>[1, 2]<|call|>", None,
     "<|channel|>commentary to=functions.add <|constrain|>json<|message|>[1, 2]<|call|>", []),
    (ANALYSIS + "<|start|>assistant<|channel|>final<|message|>no end marker", "User wants weather. Use tool.",
     "no end marker", []),
]


def whole(text):
    reasoning, content = get_reasoning_parser("harmony").parse(text, False)
    content, calls = get_tool_parser("harmony").parse(content) if content is not None else (None, [])
    return reasoning, content, [(c.name, c.arguments) for c in calls]


def streamed(pieces):
    reasoner, tools = get_reasoning_parser("harmony").streamer(False), get_tool_parser("harmony").streamer()
    reasoning = content = ""
    calls = []
    for i, piece in enumerate(pieces + [None]):
        r, c = reasoner.feed(piece) if piece is not None else reasoner.finish()
        c, found = tools.feed(c)
        if piece is None:
            c2, more = tools.finish()
            c, found = c + c2, found + more
        reasoning, content, calls = reasoning + r, content + c, calls + [(x.name, x.arguments) for x in found]
    return reasoning or None, content or None, calls


@pytest.mark.parametrize("text,reasoning,content,calls", CASES)
def test_harmony_whole_and_streamed_in_every_split(text, reasoning, content, calls):
    assert whole(text) == (reasoning, content, calls)
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == (reasoning, content, calls), cut
    assert streamed(list(text)) == (reasoning, content, calls)


def test_forcing_a_call_is_refused_with_a_reason():
    from service.errors import ApiError

    with pytest.raises(ApiError, match="not supported with the harmony format"):
        get_tool_parser("harmony").forcing_grammar([], None, False)


def test_the_chat_endpoint_keeps_special_tokens_for_harmony():
    """The markers are special tokens: the chat endpoint must not strip them from the output text."""
    assert get_reasoning_parser("harmony").keeps_special_tokens
    assert not getattr(get_reasoning_parser("qwen3"), "keeps_special_tokens", False)
