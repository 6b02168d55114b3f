"""Defects found in chat tool calling and reasoning (service/serving_chat.py, service/reasoning.py,
service/tool_parsers/), each pinned by a test that failed before its fix."""

import json
import re

import openai
import pytest

from tests.api_fixtures import TOOL_TEMPLATE
from tests.service_fixtures import API_KEY, ServerProcess
from tests.test_service_tools import TOOLS, USER, check_calls

# The generation prompt of thinking-only templates (Qwen3-*-Thinking-2507, DeepSeek-R1's later template) ends with an
# opened `<think>`: the output starts inside the thinking.
_GENERATION_PROMPT = """{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif -%}"""


@pytest.fixture(scope="module")
def thinking_api(tmp_path_factory):
    text = TOOL_TEMPLATE.read_text()
    assert _GENERATION_PROMPT in text
    template = tmp_path_factory.mktemp("templates") / "thinking_chat.jinja"
    template.write_text(text.replace(_GENERATION_PROMPT, "<think>\n"))
    server = ServerProcess(["--max-model-len", "2048", "--chat-template", str(template), "--reasoning-parser", "qwen3"],
                           env={"STATICMOE_API_KEY": API_KEY}, api_key=API_KEY)
    try:
        server.wait_healthy()
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    finally:
        server.stop()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_forced_call_after_a_prompt_that_opens_thinking_is_a_tool_call(thinking_api, choice):
    """The template wrote `<think>`; a forced call must still come back as `tool_calls` (it came back as
    reasoning_content, with no tool_calls and finish_reason "stop", since the grammar never closed the thinking)."""
    names = {"get_weather", "add"} if choice == "required" else {"add"}
    kwargs = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, seed=3, max_tokens=1000)
    r = thinking_api.chat.completions.create(**kwargs)
    message = r.choices[0].message
    check_calls(message.tool_calls, names)
    assert message.content is None or not message.content.strip()
    assert "<tool_call>" not in (message.model_extra.get("reasoning_content") or "")
    assert r.choices[0].finish_reason == ("tool_calls" if choice == "required" else "stop")
    chunks = [c for c in thinking_api.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]  # same seed, same calls
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    assert reasoning == (message.model_extra.get("reasoning_content") or "")
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


@pytest.fixture(scope="module")
def tiny_engine():
    from model.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=2))


def test_forced_call_grammar_lets_the_model_close_its_thinking_and_bounds_it(tiny_engine):
    from model.engine.structured_output import compile_grammar
    from service.reasoning import FORCED_THINKING_MAX_TOKENS, Qwen3ReasoningParser
    from service.tool_parsers import get_tool_parser

    reasoner, hermes = Qwen3ReasoningParser(), get_tool_parser("hermes")
    grammar = compile_grammar("grammar", hermes.forcing_grammar(TOOLS, None, False), tiny_engine.tokenizer,
                              tiny_engine.model_config.vocab_size, tiny_engine.eos_token_ids, reasoner.close_thinking())
    tokenizer = tiny_engine.tokenizer
    # the model ends its thinking itself
    written = 'The sum, so add.</think>\n\n<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    matcher = grammar.new_matcher()
    assert matcher.consume_tokens(tokenizer.encode(written, add_special_tokens=False)) and matcher.is_accepting()
    reasoning, content = reasoner.parse(written, starts_in_think=True)
    assert reasoning == "The sum, so add."
    content, calls = hermes.parse(content)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    # a model that would think on is made to close its thinking at the bound
    matcher = grammar.new_matcher()
    x = tokenizer.encode("x", add_special_tokens=False)
    for _ in range(FORCED_THINKING_MAX_TOKENS):
        assert matcher.consume_tokens(x)
    forced = tokenizer.decode(matcher.compute_ff_tokens())
    assert forced.startswith("</think>\n\n<tool_call>\n{"), forced


REGEX = r"[a-z]{3,8}/[0-9]{2}"  # with a "/", which Lark's /.../ needs escaped
# a client's Lark grammar whose rule names are those of the thinking-closing prefix (service/reasoning.py)
LARK = 'start: thinking_text\nthinking_text: answer "!"\nanswer: "ok" | "no"'
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"],
          "additionalProperties": False}


@pytest.mark.parametrize("constraint", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
    {"response_format": {"type": "json_object"}},
    {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}},
    {"extra_body": {"structured_outputs": {"regex": REGEX}}},
    {"extra_body": {"structured_outputs": {"grammar": LARK}}}], ids=["json_schema", "json_object", "choice", "regex",
                                                                     "grammar"])
def test_structured_output_after_a_prompt_that_opens_thinking_is_the_content(thinking_api, constraint):
    """The JSON (or the choice) is the answer: it came back as reasoning_content with content null, as the output
    started inside the thinking the template opened and the constraint never closed it."""
    import jsonschema

    kwargs = dict(model="tiny", messages=USER, seed=5, max_tokens=800, **constraint)
    r = thinking_api.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert message.content is not None, message
    content = message.content.strip()
    if "choice" in json.dumps(constraint):
        assert content in ("yes", "no")
    elif "regex" in json.dumps(constraint):
        assert re.fullmatch(REGEX, content), message.content  # after the "\\n\\n" that follows </think>
    elif "grammar" in json.dumps(constraint):
        assert content in ("ok!", "no!"), message.content
    else:
        jsonschema.validate(json.loads(content), SCHEMA if "json_schema" in json.dumps(constraint) else
                            {"type": "object"})
    assert "</think>" not in content and isinstance(message.model_extra.get("reasoning_content"), str)
    assert r.choices[0].finish_reason == "stop"
    chunks = [c for c in thinking_api.chat.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == \
        message.model_extra["reasoning_content"]


def test_bad_schema_after_a_prompt_that_opens_thinking_names_the_schema(thinking_api):
    """With the thinking template the schema is compiled inside the thinking-closing grammar; a schema that cannot
    compile still gets the schema's own 400 (kind and field), not one about the wrapper grammar."""
    bad = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["a"]}
    with pytest.raises(openai.BadRequestError) as caught:
        thinking_api.chat.completions.create(
            model="tiny", messages=USER, max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": bad}})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "invalid_grammar", error
    assert error["message"].startswith("Invalid json schema"), error
    assert error["param"] == "response_format.json_schema.schema", error
