"""A request whose response formatting raises (a bug in a parser or formatter, injected here into the completions
choice) must not outlive its HTTP answer, and a stream must say in-band that it failed. Both were defects of
service/serving.py (OpenAIServing.collect / OpenAIServing.stream).

Seen before any fix: the non-streaming request answers 500 yet its engine request keeps generating to max_tokens
(a sequence slot and its KV blocks held for nobody: `collect` aborts the group only when the consumer is still
running, not when it raised); the stream is cut mid-body (`peer closed connection without sending complete
message body`), with neither an error event nor [DONE] (`stream` reports only ApiError in-band)."""

import json
import time

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
import service.serving_completions as serving_completions  # noqa: E402
from model.engine import EngineConfig, LLMEngine  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine_client import ClientOptions, EngineClient  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.service_fixtures import InProcessServer, wait_for  # noqa: E402

BODY = {"prompt": "a", "max_tokens": 2000, "ignore_eos": True}


@pytest.fixture
def failing_server(monkeypatch):
    """A server whose completion choices raise KeyError on their third output."""
    add = serving_completions._Choice.add
    calls = {"n": 0}

    def add_then_fail(self, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("injected formatter bug")
        return add(self, output)

    monkeypatch.setattr(serving_completions._Choice, "add", add_then_fail)
    client = EngineClient(lambda: LLMEngine(EngineConfig(model="tiny", max_model_len=2048, max_num_seqs=4)),
                          ClientOptions(model_name="tiny", max_running=4, max_queue=4))
    with InProcessServer(create_app(client, ServiceSettings())) as server:
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=60)
        yield client, server


def test_a_request_that_failed_with_500_is_aborted_in_the_engine(failing_server):
    client, server = failing_server
    answer = httpx.post(server.base_url + "/v1/completions", json=BODY, timeout=60)
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
    wait_for(lambda: client.inflight == 0 and not client.engine.has_unfinished_requests(), timeout=0.5,
             interval=0.05)  # (2000 tokens take the tiny model several seconds: only an abort ends it this soon)


def test_a_stream_whose_formatting_fails_ends_with_an_error_event_and_done(failing_server):
    client, server = failing_server
    lines = []
    with httpx.stream("POST", server.base_url + "/v1/completions", json={**BODY, "stream": True},
                      timeout=60) as response:
        try:
            lines.extend(line for line in response.iter_lines() if line)
        except httpx.RemoteProtocolError:
            pytest.fail(f"the stream was cut after {len(lines)} lines, with no error event")
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error"
    time.sleep(0.3)
    assert client.inflight == 0
