"""Structured output over HTTP (issue 20.4): with random weights every constrained output parses and validates
against its schema (or matches its regex, choice or grammar), in chat and completions, streaming and not, for n
choices; bad schemas and conflicting constraints are a 400 naming the field."""

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.service_fixtures import API_KEY, served  # noqa: F401

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                                "email": {"type": "string", "format": "email", "maxLength": 20}},
               "required": ["name", "age"], "additionalProperties": False},
    "list": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                         "ok": {"type": "boolean"}},
                                        "required": ["id", "ok"], "additionalProperties": False},
             "minItems": 1, "maxItems": 3},
    "nested": {"type": "object", "properties": {
        "kind": {"enum": ["a", "b", "c"]}, "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,4}$"}, "maxItems": 3},
        "child": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"x": {"type": "integer"}},
                                                "required": ["x"], "additionalProperties": False}]}},
        "required": ["kind", "score", "tags", "child"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def json_schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_outputs_validate(client, name, stream):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": f"Give me a {name}"}], n=3, temperature=1.0,
                  seed=7, max_tokens=300, response_format=json_schema_format(name))
    if stream:
        texts, finish = [""] * 3, [None] * 3
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
    else:
        r = client.chat.completions.create(**kwargs)
        texts = [c.message.content for c in r.choices]
        finish = [c.finish_reason for c in r.choices]
    assert finish == ["stop"] * 3, texts
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=jsonschema.FormatChecker())
    assert len(set(texts)) > 1, "three seeds, three different outputs"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_structured_outputs_kinds(client, stream):
    cases = {
        "json": ({"json": SCHEMAS["person"]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS["person"])),
        "regex": ({"regex": r"(0|[1-9]\d{0,2})\.\d{2} EUR"},
                  lambda t: re.fullmatch(r"(0|[1-9]\d{0,2})\.\d{2} EUR", t) or pytest.fail(t)),
        "choice": ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma") or pytest.fail(t)),
        "grammar": ({"grammar": 'start: "[" item ("," item)* "]"\nitem: /[a-z]{1,3}/'},
                    lambda t: re.fullmatch(r"\[[a-z]{1,3}(,[a-z]{1,3})*\]", t) or pytest.fail(t)),
        "gbnf": ({"grammar": 'root ::= "x=" [0-9]+ ";"'}, lambda t: re.fullmatch(r"x=\d+;", t) or pytest.fail(t)),
        "object": ({"json_object": True}, lambda t: isinstance(json.loads(t), dict) or pytest.fail(t)),
    }
    # any JSON object has strings of any length: quotes and braces made likelier keep it within max_tokens
    closing = {str(ord('"')): 4.0, str(ord("}")): 4.0}
    for name, (spec, check) in cases.items():
        kwargs = dict(model="tiny", prompt="Answer: ", max_tokens=300, temperature=1.0, seed=1, n=2,
                      logit_bias=closing if name == "object" else None, extra_body={"structured_outputs": spec})
        if stream:
            texts = ["", ""]
            for chunk in client.completions.create(stream=True, **kwargs):
                for c in chunk.choices:
                    texts[c.index] += c.text
        else:
            texts = [c.text for c in client.completions.create(**kwargs).choices]
        for text in texts:
            check(text)


def test_legacy_guided_fields_and_response_format_on_completions(client):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=100, seed=2,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model="tiny", prompt="x", max_tokens=200, seed=2,
                                  extra_body={"guided_json": json.dumps(SCHEMAS["list"])})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["list"])
    r = client.completions.create(model="tiny", prompt="x", max_tokens=200, seed=2,
                                  extra_body={"response_format": json_schema_format("nested")})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["nested"])


def test_unconstrained_output_is_not_json(client):
    """The tests above could fail: the same requests without a constraint give no JSON."""
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Give me a person"}], n=3,
                                       temperature=1.0, seed=7, max_tokens=40)
    for c in r.choices:
        with pytest.raises(ValueError):
            json.loads(c.message.content)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "[unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_bad_constraints_get_400_naming_the_field(served, extra, param):
    response = httpx.post(served.base_url + "/v1/chat/completions", headers=served.headers, timeout=30,
                          json={"messages": [{"role": "user", "content": "a"}], **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
