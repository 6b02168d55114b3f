"""Bad input and overload over real HTTP: one OpenAI error body, the right 4xx/503, never a 5xx."""

import asyncio
import json
import threading

import httpx
import openai
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import (API_KEY, MAX_BODY_BYTES, MAX_MODEL_LEN, InProcessServer,  # noqa: E402
                                    ServerProcess, metric, parse_metrics, wait_for)

pytest_plugins = ["tests.service_fixtures"]

ERROR_KEYS = {"message", "type", "param", "code"}


def post(server, path, body=None, raw: bytes | None = None, headers=None, **kwargs) -> httpx.Response:
    headers = {**server.headers, **(headers or {})}
    if raw is not None:
        return httpx.post(server.base_url + path, content=raw, headers={"Content-Type": "application/json",
                                                                        **headers}, timeout=60, **kwargs)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None = None, type_: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


# ---- 400: invalid values and wrong JSON types --------------------------------------------------------------------
WRONG_COMPLETION_BODIES = [
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -2}, "top_k"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": "2"}, "n"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "seed": 2**63}, "seed"),  # any int64 is a seed (as vLLM), negative ones too
    ({"prompt": "a", "seed": -2**63 - 1}, "seed"),
    ({"prompt": "a", "seed": "7"}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [300]}, "prompt"),  # past the tiny model's 259-token vocabulary
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, "model"),
    ({"prompt": "a", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x" * 400, "max_tokens": 200}, "max_tokens"),  # 400 + 200 > MAX_MODEL_LEN
    ({"prompt": "x" * (MAX_MODEL_LEN + 10)}, "prompt"),
]


@pytest.mark.parametrize("body,param", WRONG_COMPLETION_BODIES, ids=lambda v: json.dumps(v)[:60])
def test_invalid_completion_bodies_get_400_naming_the_field(served, body, param):
    assert_error(post(served, "/v1/completions", body), 400, param, "invalid_request_error")


WRONG_CHAT_BODIES = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": None}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
]


@pytest.mark.parametrize("body,param", WRONG_CHAT_BODIES, ids=lambda v: json.dumps(v)[:60])
def test_invalid_chat_bodies_get_400_naming_the_field(served, body, param):
    assert_error(post(served, "/v1/chat/completions", body), 400, param, "invalid_request_error")


CONFLICTING_CONSTRAINTS = [  # allowed_token_ids that leave nothing to sample (the API hunt's D4: token 0 came out)
    ({"allowed_token_ids": [98], "bad_words": ["b"]}, "bad_words"),
    ({"allowed_token_ids": [98, 99], "bad_words": ["b", "c"]}, "bad_words"),
    ({"allowed_token_ids": [256], "min_tokens": 3}, "EOS"),
    ({"allowed_token_ids": [97, 256], "min_tokens": 1, "stop_token_ids": [97]}, "stop_token_ids"),
]


@pytest.mark.parametrize("extra,named", CONFLICTING_CONSTRAINTS, ids=lambda v: json.dumps(v)[:60])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_allowed_token_ids_that_every_ban_excludes_get_400_naming_both(served, extra, named, path):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    error = assert_error(post(served, path, {**body, "max_tokens": 5, **extra}), 400, "allowed_token_ids",
                         "invalid_request_error")
    assert error["code"] == "conflicting_constraints" and named in error["message"], error


@pytest.mark.parametrize("extra", [{"allowed_token_ids": [98, 99], "bad_words": ["b"]},
                                   {"allowed_token_ids": [256], "min_tokens": 3, "ignore_eos": True},
                                   {"allowed_token_ids": [256], "stop_token_ids": [256]}])
def test_allowed_token_ids_with_a_token_left_are_served(served, extra):
    r = post(served, "/v1/completions", {"prompt": "x", "max_tokens": 3, "return_token_ids": True, **extra})
    assert r.status_code == 200, r.text
    assert set(r.json()["choices"][0]["token_ids"]) <= set(extra["allowed_token_ids"])


def test_min_tokens_with_echo_and_max_tokens_0_is_a_400(served):
    """max_tokens 0 with echo scores the prompt (one token is generated internally and dropped): min_tokens 1
    asks for more output than max_tokens allows."""
    assert_error(post(served, "/v1/completions", {"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 1}),
                 400, "min_tokens")


@pytest.mark.parametrize("raw", [b'{"prompt": "a",', b"", b"not json", b"[1, 2]", b"null", b'"a string"',
                                 b'{"prompt": "a", "temperature": NaN}', b"\xff\xfe{}"])
def test_malformed_json_gets_400(served, raw):
    assert_error(post(served, "/v1/completions", raw=raw), 400)


def test_openai_client_raises_bad_request_for_unknown_model_and_overlong_context(served):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 300}],
                                       max_tokens=300)
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)


def test_unknown_route_and_method_use_the_same_error_body(served):
    assert_error(httpx.get(served.base_url + "/v1/nothing", headers=served.headers), 404)
    assert_error(httpx.delete(served.base_url + "/v1/completions", headers=served.headers), 405)


# ---- 401 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Bearer test-kez", "Basic test-key", "test-key",
                                    "Bearer", "Bearer test-key-and-more"])
def test_wrong_or_missing_key_gets_401(served, header):
    headers = {"Authorization": header} if header is not None else {}
    response = httpx.post(served.base_url + "/v1/completions", json={"prompt": "a"}, headers=headers)
    assert_error(response, 401, type_="authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(served.base_url + "/v1/models", headers=headers), 401)


def test_openai_client_with_a_wrong_key_raises_authentication_error(served):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ---- 413 ------------------------------------------------------------------------------------------------------
def test_body_over_the_limit_gets_413_by_content_length(served):
    body = json.dumps({"prompt": "a", "user": "u" * MAX_BODY_BYTES}).encode()
    error = assert_error(post(served, "/v1/completions", raw=body), 413)
    assert str(MAX_BODY_BYTES) in error["message"]


def test_chunked_body_over_the_limit_gets_413_while_streaming_in(served):
    def chunks():  # no Content-Length: httpx sends Transfer-Encoding: chunked
        yield b'{"prompt": "a", "user": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 4):
            yield b"u" * 1024
        yield b'"}'

    response = httpx.post(served.base_url + "/v1/completions", content=chunks(),
                          headers={**served.headers, "Content-Type": "application/json"}, timeout=60)
    assert_error(response, 413)


def test_body_just_under_the_limit_is_served(served):
    filler = "u" * (MAX_BODY_BYTES - 200)
    response = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 2, "user": filler})
    assert response.status_code == 200, response.text


# ---- 429 and 503 ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_servers():
    """A server with one running slot and one queue slot (429), and one with a tiny context for fuzzing."""
    throttled = ServerProcess(["--max-num-seqs", "1", "--max-queue", "1"])
    fuzzed = ServerProcess(["--max-num-seqs", "2", "--max-queue", "2", "--max-model-len", "48",
                            "--max-body-bytes", "65536"], env={"STATICMOE_API_KEY": API_KEY}, api_key=API_KEY)
    try:
        yield throttled.wait_healthy(), fuzzed.wait_healthy()
    finally:
        throttled.stop()
        fuzzed.stop()


def test_full_queue_gets_429_and_frees_up_after(small_servers):
    server = small_servers[0]
    long_stream = {"prompt": "a", "max_tokens": 3000, "ignore_eos": True, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            async with http.stream("POST", "/v1/completions", json=long_stream) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()
                await anext(lines)  # admitted and generating
                async with http.stream("POST", "/v1/completions", json=long_stream) as queued:
                    assert queued.status_code == 200  # admitted into the one queue slot
                    refused = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
                    assert_error(refused, 429, type_="rate_limit_error")
                    assert refused.headers["retry-after"] == "1"
                    with pytest.raises(openai.RateLimitError):
                        await openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) \
                            .completions.create(model="tiny", prompt="a", max_tokens=2)
            # both streams closed by the client: their engine requests are aborted, the slots free again
            async def served_again():
                response = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
                return response.status_code == 200

            for _ in range(100):
                if await served_again():
                    return
                await asyncio.sleep(0.1)
            pytest.fail("slots not freed after the clients disconnected")

    asyncio.run(scenario())
    # the two refusals above, plus any retry that came before the aborts freed the slots
    assert metric(parse_metrics(server.metrics_text()), "staticmoe_requests_rejected_total", reason="queue_full") >= 2


def test_503_while_the_model_loads_then_200(tmp_path):
    from model.engine import EngineConfig, LLMEngine
    from service.app import create_app
    from service.engine_client import ClientOptions, EngineClient
    from service.settings import ServiceSettings

    gate = threading.Event()

    def slow_factory():
        gate.wait(60)
        return LLMEngine(EngineConfig(model="tiny", max_model_len=128, max_num_seqs=4))

    client = EngineClient(slow_factory, ClientOptions(model_name="tiny", max_running=4))
    with InProcessServer(create_app(client, ServiceSettings())) as server:
        error = assert_error(httpx.get(server.base_url + "/health"), 503)
        assert error["code"] == "loading"
        refused = httpx.post(server.base_url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert_error(refused, 503, type_="service_unavailable_error")
        gate.set()
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=60)
        response = httpx.post(server.base_url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert response.status_code == 200, response.text


# ---- fuzzing ---------------------------------------------------------------------------------------------------
def test_schema_fuzzing_finds_no_server_error(small_servers):
    """Positive and negative cases generated from /openapi.json: every answer is < 500 (bounded: ~40 s)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode

    server = small_servers[1]
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    failures = []
    for mode, examples in ((GenerationMode.POSITIVE, 60), (GenerationMode.NEGATIVE, 60)):
        strategy = schema.as_strategy(generation_mode=mode, headers=server.headers)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            response = case.call(base_url=server.base_url, headers=server.headers, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:5]
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_tokenize_refuses_a_user_message_without_content(served):
    """/tokenize reads chat messages as chat completions do: a user turn with no content is a 400 naming it."""
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}
    error = assert_error(post(served, "/tokenize", body), 400, "messages.1.content", "invalid_request_error")
    assert error["code"] == "missing_field", error
    ok = post(served, "/tokenize", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})
    assert ok.status_code == 200 and ok.json()["count"] > 0, ok.text
