"""gpt-oss's harmony output with odd message sequences, over HTTP (tests/test_harmony_http.py's server: a tiny
gpt_oss checkpoint whose grammar-forced output is the harmony text), whole and streamed.

A message addressed to a recipient outside `functions.` (gpt-oss's built-in `python`, `browser.*` tools, which a
model trained with them writes unasked) is no call of a client function. As vLLM's harmony chat path reads it: only
`functions.NAME` recipients are `tool_calls`; such a message on the analysis channel is reasoning, on another
channel it is left out. It came back as a tool call named `browser.search`, or (non-JSON arguments) as content holding
harmony markers and a `functions.python` recipient the model never wrote."""

import pytest

from tests.test_harmony_http import ANALYSIS, calls_of, create, harmony_server  # noqa: F401

PYTHON = "<|start|>assistant<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>"
BROWSER = '<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"query": "Paris weather"}<|call|>'
CASES = {  # harmony text -> (reasoning_content, content)
    "python_on_analysis": (ANALYSIS + PYTHON, "User wants the weather. Use the tool.print(6 * 7)", None),
    "browser_on_commentary": (BROWSER, None, None),
    "preamble_then_browser": ("<|channel|>commentary<|message|>Searching.<|end|><|start|>assistant" + BROWSER, None,
                              "Searching."),
}


def streamed(client, text):
    reasoning, content, calls, finish = "", "", [], None
    for chunk in create(client, text, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += delta.model_extra.get("reasoning_content") or ""
            content += delta.content or ""
            calls += delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    return reasoning or None, content or None, calls, finish


@pytest.mark.parametrize("case", CASES)
def test_built_in_tool_recipients_are_not_function_calls(harmony_server, case):
    client, _ = harmony_server
    text, reasoning, content = CASES[case]
    choice = create(client, text).choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content == content
    assert choice.message.model_extra["reasoning_content"] == reasoning
    assert choice.finish_reason == "stop"
    assert streamed(client, text) == (reasoning, content, [], "stop")
