"""X-Request-Id: the header a gateway or a client sets to trace one request. vLLM takes it as the request id (it
wins over the body's `request_id`: `_base_request_id` in vllm/entrypoints/openai/serving_engine.py), so the
response id is `cmpl-<it>` / `chatcmpl-<it>`; and the response carries it back, as OpenAI's API sends
`x-request-id` (the `openai` client's `_request_id`). Before, the header was ignored and not echoed."""

import json

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import ServerProcess  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]


def post(server: ServerProcess, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60, headers={**server.headers, **(headers or {})})


def test_the_header_names_a_completion_and_comes_back(served):
    response = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 2}, {"X-Request-Id": "trace-123"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "cmpl-trace-123"
    assert response.headers.get("x-request-id") == "trace-123"


def test_the_header_names_every_chunk_of_a_chat_stream(served):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json=body, timeout=60,
                      headers={**served.headers, "X-Request-Id": "chat-trace-9"}) as response:
        assert response.status_code == 200
        assert response.headers.get("x-request-id") == "chat-trace-9"
        ids = {json.loads(line[6:])["id"] for line in response.iter_lines()
               if line.startswith("data: {")}
    assert ids == {"chatcmpl-chat-trace-9"}


def test_the_header_wins_over_the_body_field_as_in_vllm(served):
    response = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 1, "request_id": "from-body"},
                    {"X-Request-Id": "from-header"})
    assert response.json()["id"] == "cmpl-from-header"
    # without the header the body's field still names it
    assert post(served, "/v1/completions", {"prompt": "a", "max_tokens": 1, "request_id": "b1"}).json()["id"] \
        == "cmpl-b1"


def test_errors_carry_the_header_back_too(served):
    refused = httpx.post(served.base_url + "/v1/completions", json={"prompt": "a"}, timeout=30,
                         headers={"X-Request-Id": "no-key-1"})  # the guard's own 401
    assert refused.status_code == 401 and refused.headers.get("x-request-id") == "no-key-1"
    bad = post(served, "/v1/completions", {"prompt": "a", "max_tokens": -1}, {"X-Request-Id": "bad-1"})
    assert bad.status_code == 400 and bad.headers.get("x-request-id") == "bad-1"


def test_a_header_longer_than_the_body_field_allows_is_a_400_naming_it(served):
    response = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 1}, {"X-Request-Id": "x" * 257})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "X-Request-Id" and error["code"] == "invalid_value", error
    assert post(served, "/v1/completions", {"prompt": "a", "max_tokens": 1},
                {"X-Request-Id": "y" * 256}).json()["id"] == "cmpl-" + "y" * 256
