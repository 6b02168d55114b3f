"""/reset_prefix_cache (vLLM's admin path) while the engine cannot run it. Before: during a hung step it queued its
command and waited on it for as long as the step hung (the client's connection with it), where every other route
answers 503 `engine_stalled` at once; while loading it answered 503 with code `loading`, not the
`model_loading` every other route and docs/service.md use."""

import threading
import time

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from model.engine import EngineConfig, LLMEngine  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine_client import ClientOptions, EngineClient  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.service_fixtures import InProcessServer, wait_for  # noqa: E402

RESET = "/reset_prefix_cache"


class HangableEngine(LLMEngine):
    """The tiny model's engine; while `hang` is set a step waits for `release` (a stuck kernel)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hang, self.release = threading.Event(), threading.Event()

    def step(self):
        if self.hang.is_set():
            self.release.wait(60)
        return super().step()


def serve(factory, stall_timeout_s: float = 120.0):
    client = EngineClient(factory, ClientOptions(model_name="tiny", max_running=4, max_queue=4,
                                                 stall_timeout_s=stall_timeout_s))
    return client, InProcessServer(create_app(client, ServiceSettings()))


def test_reset_during_a_hung_step_is_a_prompt_503_engine_stalled():
    client, server = serve(lambda: HangableEngine(EngineConfig(model="tiny", max_model_len=256, max_num_seqs=4)),
                           stall_timeout_s=1.0)
    with server:
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=60)
        engine = client.engine
        engine.hang.set()
        body = {"prompt": "a", "max_tokens": 100, "ignore_eos": True}
        worker = threading.Thread(target=lambda: httpx.post(server.base_url + "/v1/completions", json=body,
                                                            timeout=60))
        worker.start()  # its step hangs
        try:
            wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 503, timeout=15)
            started = time.monotonic()
            try:
                answer = httpx.post(server.base_url + RESET, json={}, timeout=10)
            except httpx.ReadTimeout:
                pytest.fail("/reset_prefix_cache waited on the hung engine")
            assert time.monotonic() - started < 5
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "engine_stalled"
            assert answer.headers.get("retry-after") == "1"
        finally:
            engine.hang.clear()
            engine.release.set()
            worker.join(60)
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=15)
        done = httpx.post(server.base_url + RESET, json={}, timeout=30)
        assert done.status_code == 200 and done.json()["status"] == "ok"


def test_reset_that_starts_before_a_step_hangs_ends_with_503_when_the_stall_is_seen():
    """The command is queued behind a step that then hangs: the answer comes once the stall is detected."""
    client, server = serve(lambda: HangableEngine(EngineConfig(model="tiny", max_model_len=256, max_num_seqs=4)),
                           stall_timeout_s=1.0)
    with server:
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=60)
        engine = client.engine
        engine.hang.set()
        body = {"prompt": "a", "max_tokens": 100, "ignore_eos": True}
        worker = threading.Thread(target=lambda: httpx.post(server.base_url + "/v1/completions", json=body,
                                                            timeout=60))
        worker.start()
        try:
            wait_for(lambda: engine.has_unfinished_requests(), timeout=15)
            time.sleep(0.2)  # the step is under way (and hangs), not yet counted as a stall
            try:
                answer = httpx.post(server.base_url + RESET, json={}, timeout=15)
            except httpx.ReadTimeout:
                pytest.fail("/reset_prefix_cache waited on the hung engine")
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_stalled", answer.text
        finally:
            engine.hang.clear()
            engine.release.set()
            worker.join(60)


def test_reset_while_the_model_loads_uses_the_model_loading_code():
    loaded = threading.Event()

    def slow_factory():
        loaded.wait(60)
        return LLMEngine(EngineConfig(model="tiny", max_model_len=256, max_num_seqs=4))

    client, server = serve(slow_factory)
    with server:
        try:
            completion = httpx.post(server.base_url + "/v1/completions", json={"prompt": "a"}, timeout=10)
            reset = httpx.post(server.base_url + RESET, json={}, timeout=10)
            assert completion.status_code == reset.status_code == 503
            assert reset.json()["error"]["code"] == completion.json()["error"]["code"] == "model_loading"
        finally:
            loaded.set()
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 200, timeout=60)
