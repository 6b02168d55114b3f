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


def _tokenizer_with_a_very_long_token(directory) -> int:
    """A byte-level BPE trained on text with a long repeated run, so that one token is hundreds of bytes: more than
    llguidance's token trie indexes (it panics). Returns the longest token's length in bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["hello world " * 50, "的一是在不了有和人这" * 200] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=["<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return max(len(tok.decode([i]).encode()) for i in range(tok.get_vocab_size()))


def test_a_tokenizer_the_grammar_engine_cannot_index_gets_a_400_not_a_500(tmp_path):
    """Found on the H100 (bench_api_costs, 2026-12-06): a BPE trained on the standard library had a 1497-byte token,
    llguidance panicked indexing it, and every constrained request got a 500 after seconds of re-indexing. Now: a
    clear 400 (each time, from the cached failure), and unconstrained requests are served as before."""
    from model.presets import PRESETS

    longest = _tokenizer_with_a_very_long_token(tmp_path)
    assert longest > 256
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny"], "vocab_size": 1024}))
    from tests.service_fixtures import ServerProcess, wait_for

    server = ServerProcess(["--model", str(tmp_path), "--random-weights", "--served-model-name", "long-token"])
    try:
        server.wait_healthy()
        # indexed at start-up on its own thread: the failure is in the log before any constrained request
        wait_for(lambda: "structured output is unavailable with this model's tokenizer" in server.log_text(), 60)
        body = {"model": "long-token", "prompt": "hello", "max_tokens": 4,
                "structured_outputs": {"regex": "[a-z]{1,8}"}}
        for _ in range(2):
            r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "structured_output_unavailable"
            assert "tokenizer" in error["message"] and error["param"] == "structured_outputs.regex"
        plain = httpx.post(server.base_url + "/v1/completions", timeout=120,
                           json={"model": "long-token", "prompt": "hello", "max_tokens": 4, "ignore_eos": True})
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


# ---- grammars the engine cannot follow: never a successful "stop" ------------------------------------------------
@pytest.mark.parametrize("constraint", [
    {"regex": "(a{1000}){1000}"},  # beyond the grammar engine's limits (its lexer runs out of fuel)
    {"json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}},  # recursive: no instance
    {"grammar": "start: start"},  # unsatisfiable
    {"json": {"$ref": "#"}},
    {"regex": "[^\\x00-\\U0010FFFF]"},
], ids=lambda c: str(c)[:30])
def test_a_grammar_that_cannot_be_followed_is_a_400_before_generation(served, constraint):
    """Found by the API hunt: these came back as finish_reason "stop" with text like "{" or "a" (the grammar
    engine failed mid-output and the failure read as completion). Now compiled with a first step: a 400."""
    r = httpx.post(served.base_url + "/v1/completions", headers=served.headers, timeout=120, json={
        "prompt": "x", "max_tokens": 50, "temperature": 0, "structured_outputs": constraint})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_grammar" and error["param"].startswith("structured_outputs."), error


def test_a_grammar_left_with_no_allowed_token_ends_with_an_error_whole_or_streamed(served):
    """regex "ab" with allowed_token_ids [98] ("b"): the grammar needs "a" first, so no token satisfies both. The
    choice used to come back as "\\u0000" (token 0), finish_reason "stop". Now a 400 no_allowed_token, and a stream
    carries the same error in-band (the status line went out before generation)."""
    body = {"prompt": "x", "max_tokens": 5, "temperature": 0, "structured_outputs": {"regex": "ab"},
            "allowed_token_ids": [98], "return_token_ids": True}
    r = httpx.post(served.base_url + "/v1/completions", json=body, headers=served.headers, timeout=120)
    assert r.status_code == 400, r.text
    whole = r.json()["error"]
    assert whole["code"] == "no_allowed_token" and whole["type"] == "invalid_request_error", whole
    lines = []
    with httpx.stream("POST", served.base_url + "/v1/completions", json={**body, "stream": True},
                      headers=served.headers, timeout=120) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line]
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 1 and lines[-1] == "data: [DONE]", lines
    assert (errors[0]["type"], errors[0]["code"]) == (whole["type"], whole["code"])
    assert not any('"finish_reason": "stop"' in line for line in lines), lines


def test_pathological_regexes_neither_stall_the_engine_nor_fail_other_requests():
    """The API hunt's D1: 16 requests of ~100 bytes, each a regex whose lexer took over a second to build on the
    engine thread, stalled it: with --engine-stall-timeout 5 every request in flight (an unrelated stream too) got
    503 engine_stalled and /health said stalled. Now each is a 400 from the tokenizer threads, and the unrelated
    stream's tokens keep flowing."""
    import asyncio
    import threading
    import time

    from tests.service_fixtures import ServerProcess

    server = ServerProcess(["--max-model-len", "512", "--engine-stall-timeout", "5"])
    try:
        server.wait_healthy()
        victim: dict = {}

        def run_victim():
            gaps, last = [], None
            with httpx.stream("POST", server.base_url + "/v1/completions", timeout=300, json={
                    "prompt": "hi", "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
                for line in filter(None, r.iter_lines()):
                    now = time.monotonic()
                    gaps.append(now - last if last is not None else 0.0)
                    last = now
                    victim.setdefault("lines", []).append(line)
            victim["status"], victim["worst_gap"] = r.status_code, max(gaps)

        thread = threading.Thread(target=run_victim)
        thread.start()
        time.sleep(0.2)

        async def attack():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*[client.post(server.base_url + "/v1/completions", json={
                    "prompt": "x", "max_tokens": 3, "structured_outputs": {"regex": "(a{1000}){%d}" % (1000 + i)}})
                    for i in range(16)])

        answers = asyncio.run(attack())
        thread.join(300)
        assert {(a.status_code, a.json()["error"]["code"]) for a in answers} == {(400, "invalid_grammar")}
        assert victim["status"] == 200 and not any('"error"' in line for line in victim["lines"]), victim["lines"][-3:]
        assert victim["lines"][-1] == "data: [DONE]"
        assert victim["worst_gap"] < 2.0, victim["worst_gap"]  # was 5.7 s, then the stall failed it
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
    finally:
        server.stop()
