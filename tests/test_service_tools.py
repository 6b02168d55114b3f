"""Tools and reasoning for Qwen3-style models (issue 20.3). A tiny random model cannot choose to call a tool, so:
the parsers are tested alone (whole text, and streamed in every possible split); the template round trip through
/tokenize shows tools, calls and results rendered; `tool_choice` required / named forces schema-valid calls with
random weights; and a regex constraint makes the model write a known call or thinking block, so the `auto` parsing
and reasoning split run end to end over HTTP, streaming and not."""

import json

import httpx
import jsonschema
import pytest

from service.reasoning import Qwen3ReasoningParser
from service.tool_parsers import get_tool_parser
from tests.api_fixtures import api, api_server  # noqa: F401
from tests.service_fixtures import served  # noqa: F401

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- parsers alone -----------------------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
TEXTS = [
    ("Let me check.\n" + CALL, "Let me check.\n", [("get_weather", {"city": "Paris", "unit": "C"})]),
    (CALL + "\n" + CALL.replace("Paris", "Oslo"), None, [("get_weather", {"city": "Paris", "unit": "C"}),
                                                          ("get_weather", {"city": "Oslo", "unit": "C"})]),
    ("no calls <tool_ here", "no calls <tool_ here", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ("unterminated " + CALL[:-5], "unterminated " + CALL[:-5], []),
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("add", {"a": 1})]),
]


@pytest.mark.parametrize("text,content,calls", TEXTS)
def test_hermes_parser_whole_and_streamed_in_every_split(text, content, calls):
    parser = get_tool_parser("hermes")
    got_content, got_calls = parser.parse(text)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            streamer = parser.streamer()
            out, found = "", []
            for piece in pieces:
                c, f = streamer.feed(piece)
                out, found = out + c, found + f
            c, f = streamer.finish()
            out, found = out + c, found + f
            assert (out or None) == content and [(x.name, x.arguments) for x in found] == calls, (cut, pieces)


REASONING = [
    ("<think>\nplan\n</think>\n\nanswer", False, "\nplan\n", "\n\nanswer"),
    ("plan only</think>answer", True, "plan only", "answer"),
    ("just an answer", False, None, "just an answer"),
    ("<think>cut off", False, "cut off", None),
    ("thinking, cut off", True, "thinking, cut off", None),
    ("<thinking> is not the tag", False, None, "<thinking> is not the tag"),
]


@pytest.mark.parametrize("text,starts_in_think,reasoning,content", REASONING)
def test_reasoning_parser_whole_and_streamed(text, starts_in_think, reasoning, content):
    parser = Qwen3ReasoningParser()
    assert parser.parse(text, starts_in_think) == (reasoning, content)
    for cut in range(len(text) + 1):
        streamer = parser.streamer(starts_in_think)
        r1, c1 = streamer.feed(text[:cut])
        r2, c2 = streamer.feed(text[cut:])
        r3, c3 = streamer.finish()
        assert (r1 + r2 + r3 or None) == reasoning and (c1 + c2 + c3 or None) == content, cut


# ---- the chat template -------------------------------------------------------------------------------------------
def test_tools_calls_and_results_are_rendered_by_the_template(api_server):
    history = USER + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    body = {"messages": history, "tools": TOOLS, "chat_template_kwargs": {"enable_thinking": False}}
    tokens = httpx.post(api_server.base_url + "/tokenize", json=body, headers=api_server.headers).json()["tokens"]
    text = httpx.post(api_server.base_url + "/detokenize", json={"tokens": tokens},
                      headers=api_server.headers).json()["prompt"]
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in text  # the tool definitions, as tojson writes them
    assert CALL in text  # the assistant's call, arguments as an object
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("assistant\n<think>\n\n</think>\n\n")  # enable_thinking: false reached the template
    response = httpx.post(api_server.base_url + "/v1/chat/completions", headers=api_server.headers,
                          json={**body, "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(tokens)


# ---- forced calls with random weights ----------------------------------------------------------------------------
def check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_tool_calls_are_schema_valid(api, choice, seed):
    names = {"get_weather", "add"} if choice == "required" else {"add"}
    r = api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, seed=seed,
                                    max_tokens=1000, parallel_tool_calls=choice == "required")
    message = r.choices[0].message
    check_calls(message.tool_calls, names)
    assert message.content is None
    assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    if choice != "required":
        assert len(message.tool_calls) == 1
    stream = list(api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                              seed=seed, max_tokens=1000, stream=True))
    deltas = [d for c in stream if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    check_calls(deltas, names)
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]  # same seed, same calls
    assert not "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()


def test_parallel_tool_calls_false_makes_one_call(api):
    for seed in range(4):
        r = api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="required", seed=seed,
                                        max_tokens=400, parallel_tool_calls=False)
        assert len(r.choices[0].message.tool_calls) == 1


# ---- auto parsing and reasoning end to end ---------------------------------------------------------------------------
def regex_for(text: str) -> str:
    return "".join("\\" + ch if ch in ".^$*+?()[]{}|\\/" else ("\\n" if ch == "\n" else ch) for ch in text)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_call_and_reasoning_are_parsed(api, stream):
    written = "<think>\nParis, so Celsius.\n</think>\n\nChecking.\n" + CALL
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, max_tokens=300,
                  extra_body={"structured_outputs": {"regex": regex_for(written)}})
    if not stream:
        r = api.chat.completions.create(**kwargs)
        message = r.choices[0].message
        reasoning, content, calls = message.model_extra["reasoning_content"], message.content, message.tool_calls
        finish = r.choices[0].finish_reason
    else:
        chunks = [c for c in api.chat.completions.create(stream=True, **kwargs) if c.choices]
        reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        calls = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        finish = chunks[-1].choices[0].finish_reason
    assert reasoning == "\nParis, so Celsius.\n"
    assert content == "\n\nChecking.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "C"})]
    assert finish == "tool_calls"


def test_tool_choice_none_and_include_reasoning_false(api):
    written = "<think>x</think>" + CALL
    r = api.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=300,
                                    extra_body={"structured_outputs": {"regex": regex_for(written)},
                                                "include_reasoning": False})
    message = r.choices[0].message
    assert message.tool_calls is None and message.content == CALL and "reasoning_content" not in message.model_extra
    assert r.choices[0].finish_reason == "stop"


def test_tools_are_refused_without_a_parser_and_bad_tool_choices(served):
    server = served
    bad = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name"),
           ({"tool_choice": "required"}, "tool_choice"),
           ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
           ({"messages": USER + [{"role": "assistant", "tool_calls": [
               {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
            "messages.1.tool_calls.0.function.arguments")]
    for extra, param in bad:
        response = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers,
                              json={"messages": USER, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
