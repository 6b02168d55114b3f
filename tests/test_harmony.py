"""gpt-oss's harmony output (`--reasoning-parser harmony`, `--tool-call-parser harmony`): the reasoning parser, then
the tool parser, as the chat endpoint chains them, on texts written by hand in OpenAI's published format, whole and
streamed in every split (two pieces at every cut, and one character at a time); and the grammar that forces a call,
run by llguidance over a tokenizer whose special tokens are harmony's markers on hand-written outputs it must allow
or refuse."""

import pytest

from model.engine.structured_output import compile_grammar
from model.tokenizer import load_tokenizer
from service.errors import ApiError
from service.reasoning import get_reasoning_parser
from service.tool_parsers import get_tool_parser
from service.tool_parsers.harmony import ANALYSIS_MAX_TOKENS
from tests.test_harmony_http import VOCAB, write_harmony_checkpoint

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


# ---- the grammar that forces a call (tool_choice required or named) ------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "required": ["city"], "additionalProperties": False,
             "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}}},
         {"type": "function", "function": {"name": "add"}}]  # no parameters: any object
HEADER = "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>"
WEATHER_CALL = HEADER.format("get_weather") + '{"city":"Paris","unit":"C"}<|call|>'
ADD_CALL = HEADER.format("add") + '{"a":1}<|call|>'
PLAN = "<|channel|>analysis<|message|>Need the weather: x < 5 | y.<|end|><|start|>assistant"
FORCED = [  # (output text, tool_choice name or None for required, allowed)
    (PLAN + WEATHER_CALL, None, True),
    (WEATHER_CALL, None, True),  # the analysis is optional
    (ADD_CALL, None, True),  # any tool for "required"
    (PLAN + ADD_CALL, "add", True),
    ("<|channel|>analysis<|message|><|end|><|start|>assistant" + ADD_CALL, "add", True),
    (WEATHER_CALL, "add", False),  # not the named tool
    (WEATHER_CALL + "<|start|>assistant" + ADD_CALL, None, False),  # one call a turn, parallel or not
    (PLAN + "<|channel|>final<|message|>It is sunny.<|return|>", None, False),  # no answer instead of the call
    (PLAN, None, False),  # no call at all
    (HEADER.format("get_weather") + '{"city":5}<|call|>', None, False),  # arguments against the schema
    (HEADER.format("get_weather") + '{"unit":"C"}<|call|>', None, False),  # a required property missing
    (HEADER.format("get_weather") + '{"city": "Paris"}<|call|>', None, False),  # compact JSON only (random weights)
    (HEADER.format("add") + "[1]<|call|>", None, False),  # arguments are an object
    (HEADER.format("nope") + "{}<|call|>", None, False),  # not a tool
    ("<|channel|>analysis<|message|>a <|b<|end|><|start|>assistant" + ADD_CALL, None, False),  # "<|" as text
]


@pytest.fixture(scope="module")
def harmony_tokenizer(tmp_path_factory):
    """The tokenizer of tests/test_harmony_http.py's checkpoint: harmony's markers are its special tokens."""
    return load_tokenizer(write_harmony_checkpoint(tmp_path_factory.mktemp("harmony_tokenizer")))


def forced_matcher(tokenizer, name):
    grammar = get_tool_parser("harmony").forcing_grammar(TOOLS, name, parallel=True)
    return compile_grammar("grammar", grammar, tokenizer, VOCAB, list(tokenizer.eos_token_ids)).new_matcher()


@pytest.mark.parametrize("text,name,allowed", FORCED)
def test_forcing_grammar_allows_one_schema_valid_call_after_an_optional_analysis(harmony_tokenizer, text, name,
                                                                                  allowed):
    ids = harmony_tokenizer.encode(text, add_special_tokens=False)
    assert harmony_tokenizer.decode(ids, skip_special_tokens=False) == text
    matcher = forced_matcher(harmony_tokenizer, name)
    assert (all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()) == allowed


def test_forced_analysis_is_cut_at_its_token_bound(harmony_tokenizer):
    """After ANALYSIS_MAX_TOKENS tokens of analysis text only `<|end|>` may follow; one token earlier, text too."""
    matcher = forced_matcher(harmony_tokenizer, None)
    for token in harmony_tokenizer.encode("<|channel|>analysis<|message|>", add_special_tokens=False):
        assert matcher.consume_token(token)
    (x,) = harmony_tokenizer.encode("x", add_special_tokens=False)
    end = harmony_tokenizer.encode("<|end|>", add_special_tokens=False)

    def allowed():
        mask = matcher.compute_logit_bias()
        return {t for t in range(VOCAB) if mask[t]}

    for _ in range(ANALYSIS_MAX_TOKENS - 1):
        assert matcher.consume_token(x)
    assert {x, *end} <= allowed()
    assert matcher.consume_token(x)
    assert allowed() == set(end)


def test_forcing_a_tool_not_in_tools_is_refused():
    with pytest.raises(ApiError, match="not in tools"):
        get_tool_parser("harmony").forcing_grammar(TOOLS, "nope", False)


def test_the_chat_endpoint_keeps_special_tokens_for_harmony():
    """The markers are special tokens: the chat endpoint must not strip them from the output text."""
    assert get_reasoning_parser("harmony").keeps_special_tokens
    assert not getattr(get_reasoning_parser("qwen3"), "keeps_special_tokens", False)
