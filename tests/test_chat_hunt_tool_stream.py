"""A tool-call parser's stream must add up to its whole answer: the streamed content deltas concatenate to the
non-streamed `content` (null = nothing), the tool-call deltas to its `tool_calls`. Over HTTP with the `openai`
client (a regex makes the tiny random model write the text), and the parsers alone in every two-piece split."""

import json

import pytest

from service.tool_parsers import get_tool_parser
from tests.api_fixtures import api, api_server  # noqa: F401
from tests.test_service_tools import CALL, TOOLS, USER, regex_for

THINK = "<think>\nParis, so Celsius.\n</think>\n\n"
OUTPUTS = {  # what the model writes -> the content both ways (None: null / no content deltas)
    "thinking_then_call": (THINK + CALL, None),  # Qwen3's usual tool turn
    "newline_then_call": ("\n" + CALL, None),
    "thinking_then_blank": (THINK + "\n", None),
    "blank_call_text": ("\n\n" + CALL + "\n\nDone.", "\n\nDone."),
    "text_then_call": ("Checking.\n" + CALL, "Checking.\n"),
    # malformed or odd calls: what stays content whole stays content streamed
    "invalid_json": ("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1,}}\n</tool_call>",
                     "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1,}}\n</tool_call>"),
    "arguments_not_object": ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
                             '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'),
    "unknown_function": ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', None),
    "two_calls_text_around": ("A " + CALL + " B " + CALL.replace("Paris", "Oslo") + "\nC", "A B C"),
    "good_then_bad": (CALL + "\n<tool_call>{oops}</tool_call>", "<tool_call>{oops}</tool_call>"),
    "unterminated": ("Hm " + CALL[:-len("</tool_call>")], "Hm " + CALL[:-len("</tool_call>")]),
}


def answer_both_ways(api, written):
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, max_tokens=400,
                  extra_body={"structured_outputs": {"regex": regex_for(written)}})
    whole = api.chat.completions.create(**kwargs).choices[0]
    chunks = [c for c in api.chat.completions.create(stream=True, **kwargs) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [(d.function.name, d.function.arguments) for c in chunks for d in c.choices[0].delta.tool_calls or []]
    return whole, content, calls, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("name", OUTPUTS)
def test_streamed_content_adds_up_to_the_whole_answer(api, name):
    """Blank text before a call (Qwen3's "\\n\\n" after </think>) was null content whole but streamed as "\\n\\n"."""
    written, content = OUTPUTS[name]
    whole, streamed, streamed_calls, finish = answer_both_ways(api, written)
    assert whole.message.content == content
    assert streamed == (content or "")
    assert streamed_calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert finish == whole.finish_reason


HARMONY_CALL = '<|channel|>commentary to=functions.add <|constrain|>json<|message|>{"a": 1}<|call|>'
PARSER_TEXTS = {"hermes": ["\n" + CALL, " \n", "\n" + CALL + "\n" + CALL + "  ", "\n\n" + CALL + "x"],
                "harmony": ["\n" + HARMONY_CALL, "  ", " " + HARMONY_CALL + " x"]}


@pytest.mark.parametrize("parser_name,text", [(p, t) for p, texts in PARSER_TEXTS.items() for t in texts])
def test_parser_stream_matches_parse_on_blank_content(parser_name, text):
    parser = get_tool_parser(parser_name)
    content, calls = parser.parse(text)
    for cut in range(len(text) + 1):
        streamer = parser.streamer()
        out, found = "", []
        for piece in (text[:cut], text[cut:]):
            c, f = streamer.feed(piece)
            out, found = out + c, found + f
        c, f = streamer.finish()
        out, found = out + c, found + f
        assert out == (content or ""), cut
        assert [(x.name, json.dumps(x.arguments)) for x in found] == [(x.name, json.dumps(x.arguments)) for x in calls]
