"""History tool-call arguments reach the chat template as transformers passes them (a dict: `.items()`, `| tojson`)
and also as DeepSeek-V3's templates read them, a string joined with `+` ('```json\\n' + arguments + '\\n```'): with a
plain dict that `+` raised (400 "unsupported operand type(s)") and `{{ arguments }}` printed a Python repr
({'city': 'Paris'}, not JSON). Over HTTP with a DeepSeek-style template, and model/chat_template.py alone."""

import json

import httpx
import pytest

from model.chat_template import render_chat_template
from tests.service_fixtures import ServerProcess

# the assistant tool-call turn as DeepSeek-V3-0324's chat template writes it (string concatenation)
DEEPSEEK_STYLE = (
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}{% for tool in m.tool_calls %}"
    "{{ '<call>' + tool['function']['name'] + '\\n```json\\n' + tool['function']['arguments'] + '\\n```</call>' }}"
    "{% endfor %}{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}")
ARGS = {"city": "Paris", "days": [1, 2], "note": "naïve"}
HISTORY = [{"role": "user", "content": "Weather?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]


@pytest.fixture(scope="module")
def deepseek_style_server(tmp_path_factory):
    template = tmp_path_factory.mktemp("templates") / "deepseek_style.jinja"
    template.write_text(DEEPSEEK_STYLE)
    server = ServerProcess(["--max-model-len", "1024", "--chat-template", str(template)])
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def test_string_joined_arguments_render_as_json_over_http(deepseek_style_server):
    server = deepseek_style_server
    response = httpx.post(server.base_url + "/tokenize", timeout=60,
                          json={"messages": HISTORY, "add_generation_prompt": False})
    assert response.status_code == 200, response.text
    text = httpx.post(server.base_url + "/detokenize", timeout=60, json={"tokens": response.json()["tokens"]})
    rendered = text.json()["prompt"]
    body = rendered.split("```json\n")[1].split("\n```")[0]
    assert json.loads(body) == ARGS, rendered


def render(template: str, arguments) -> str:
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}]
    return render_chat_template(template, messages, add_generation_prompt=False)


@pytest.mark.parametrize("template", [
    "{{ messages[0].tool_calls[0].function.arguments }}",
    "{{ 'x' + messages[0].tool_calls[0].function.arguments }}",
    "{{ messages[0].tool_calls[0].function.arguments + 'x' }}",
    "{{ messages[0].tool_calls[0].function.arguments ~ '' }}",
    "{{ messages[0].tool_calls[0].function.arguments | string }}"])
def test_arguments_print_as_json(template):
    out = render(template, ARGS)
    assert json.loads(out.removeprefix("x").removesuffix("x")) == ARGS, out


def test_arguments_stay_a_mapping():
    """What transformers' convention gives templates (Qwen3's `| tojson` after `is string`, GLM-4.5's `.items()`)."""
    assert json.loads(render("{{ messages[0].tool_calls[0].function.arguments | tojson }}", ARGS)) == ARGS
    assert render("{% for k, v in messages[0].tool_calls[0].function.arguments.items() %}{{ k }}={{ v }};"
                  "{% endfor %}", {"a": 1, "b": "x"}) == "a=1;b=x;"
    assert render("{{ messages[0].tool_calls[0].function.arguments is string }}"
                  "{{ messages[0].tool_calls[0].function.arguments is mapping }}", ARGS) == "FalseTrue"
    assert render("{{ messages[0].tool_calls[0].function.arguments.city }}", ARGS) == "Paris"
    messages = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ARGS}}]}]
    render_chat_template("{{ messages }}", messages, add_generation_prompt=False)
    assert type(messages[0]["tool_calls"][0]["function"]["arguments"]) is dict  # the caller's messages untouched
