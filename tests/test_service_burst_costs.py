"""Host work the service does per request and per start-up, cut for a burst of 64 long prompts (benchmarks/NOTES.md,
"Prefix caching: the olmoe lockstep burst"): what each cut keeps unchanged, and that it is in place.

- unknown request fields are still found, nested in lists of models, while a list of token ids is not walked;
- the lone-surrogate check still finds escapes and raw bytes, and passes a body of token ids at once;
- the engine thread skips its prompt-id pass for requests the HTTP boundary already checked, and that boundary
  still refuses bad ids;
- the server freezes its start-up heap out of the garbage collector's full collections.
"""

import gc
import json

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

pytest.register_assert_rewrite("tests.service_fixtures")
from model.engine import EngineConfig, LLMEngine  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine_client import ClientOptions, EngineClient  # noqa: E402
from service.protocol import CompletionRequest  # noqa: E402
from service.protocol_chat import ChatCompletionRequest  # noqa: E402
from service.request_fields import _fields_that_may_hold_models, unknown_fields  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from service.unicode_check import lone_surrogate_field  # noqa: E402
from tests.service_fixtures import InProcessServer  # noqa: E402


class Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str = ""


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: list[int] | str = ""
    parts: list[Part | str] = []


def test_unknown_fields_are_found_in_lists_of_models_and_token_lists_are_skipped():
    body = Body.model_validate({"prompt": list(range(5000)), "parts": ["plain", {"text": "a", "colour": "red"}],
                                "extra_top": 1})
    assert unknown_fields(body) == ["extra_top", "parts.1.colour"]
    assert unknown_fields(Body.model_validate({"prompt": [1, 2, 3], "parts": ["x", {"text": "y"}]})) == []
    assert _fields_that_may_hold_models(Body) == ("parts",)
    assert "prompt" not in _fields_that_may_hold_models(CompletionRequest), "token ids are never walked"
    assert {"messages", "stream_options"} <= set(_fields_that_may_hold_models(ChatCompletionRequest))


def test_lone_surrogates_are_still_found_and_token_bodies_pass():
    tokens = json.dumps({"prompt": list(range(50000, 54000)), "max_tokens": 8}).encode()
    assert lone_surrogate_field(tokens) is None
    assert lone_surrogate_field(b'{"prompt": "ok \\u00e9 \\ud83d\\ude00"}') is None  # a valid pair
    assert lone_surrogate_field(b'{"prompt": [1, 2], "stop": ["\\ud800"]}') == "stop.0"
    assert lone_surrogate_field('{"a": "\ud800"}'.encode("utf-8", "surrogatepass")) == ""  # raw bytes: not UTF-8


class RecordingEngine(LLMEngine):
    """The tiny model's engine, recording what each add_request was told about its prompt."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_flags: list[bool] = []

    def add_request(self, request_id, prompt_token_ids, params=None, *, prompt_checked=False):
        self.checked_flags.append(prompt_checked)
        super().add_request(request_id, prompt_token_ids, params, prompt_checked=prompt_checked)


def test_prompts_checked_at_the_http_boundary_skip_the_engine_pass_and_bad_ids_are_still_refused():
    engine_box = []

    def factory():
        engine_box.append(RecordingEngine(EngineConfig(model="tiny", max_model_len=128, max_num_seqs=4)))
        return engine_box[-1]

    client = EngineClient(factory, ClientOptions(model_name="tiny", max_running=4, max_queue=4))
    with InProcessServer(create_app(client, ServiceSettings())) as server:
        client.loaded.wait(60)
        url = server.base_url + "/v1/completions"
        ok = httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}, timeout=60)
        assert ok.status_code == 200, ok.text
        for bad in ([1, 259], [1, -2], [1, True]):  # the tiny vocabulary has 259 ids
            refused = httpx.post(url, json={"prompt": bad, "max_tokens": 2}, timeout=60)
            assert refused.status_code == 400, (bad, refused.text)
    assert engine_box[0].checked_flags == [True], "only the good request reached the engine, vouched for"
    engine = engine_box[0]
    with pytest.raises(ValueError, match="not a valid id"):  # called directly, the engine still checks
        engine.add_request("direct", [1, 259])


@pytest.mark.parametrize("freeze", [True, False])
def test_the_server_freezes_its_start_up_heap_out_of_full_collections(freeze):
    gc.unfreeze()
    client = EngineClient(lambda: LLMEngine(EngineConfig(model="tiny", max_model_len=128, max_num_seqs=2)),
                          ClientOptions(model_name="tiny", max_running=2, max_queue=2, freeze_heap=freeze))
    try:
        client._load()
        frozen = gc.get_freeze_count()
        if freeze:
            assert frozen > 10000, "torch, the model and the app are frozen (a full collection skips them)"
        else:
            assert frozen == 0
    finally:
        gc.unfreeze()
