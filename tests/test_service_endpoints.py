"""vLLM's utility endpoints (issue 20.5): /tokenize, /detokenize, /version, GET /v1/models/{id}, and /metrics under
vLLM's names behind --vllm-metric-names (the same values as the staticmoe_ series; off by default)."""

import httpx
import openai
import pytest

from service.version import package_version
from tests.api_fixtures import api, api_server  # noqa: F401
from tests.service_fixtures import API_KEY, metric, parse_metrics, served  # noqa: F401


def post(server, path, body, **kw):
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=30, **kw)


def test_tokenize_and_detokenize_round_trip(served):
    text = "héllo <|im_end|>"
    out = post(served, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert out["tokens"] == list("héllo ".encode()) + [258]  # the byte tokenizer parses special-token text
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    assert out["token_strs"][:3] == ["h", "bytes:\\xc3", "bytes:\\xa9"] and out["token_strs"][-1] == "<|im_end|>"
    assert post(served, "/detokenize", {"tokens": out["tokens"][:-1]}).json() == {"prompt": "héllo "}
    chat = post(served, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    completion = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert chat["count"] == completion.usage.prompt_tokens


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [99999]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
])
def test_tokenize_errors_name_the_field(served, path, body, param):
    response = post(served, path, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_tokenize_needs_the_api_key_version_does_not(served):
    assert httpx.post(served.base_url + "/tokenize", json={"prompt": "a"}).status_code == 401
    assert httpx.post(served.base_url + "/detokenize", json={"tokens": [1]}).status_code == 401
    assert httpx.get(served.base_url + "/version").json() == {"version": package_version()}


def test_model_card_by_id(served):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_vllm_metric_names_mirror_the_staticmoe_series(api, api_server, served):
    api.completions.create(model="tiny", prompt="count me", max_tokens=3)
    samples = parse_metrics(api_server.metrics_text())
    for ours, theirs in [("staticmoe_generation_tokens_total", "vllm:generation_tokens_total"),
                         ("staticmoe_prompt_tokens_total", "vllm:prompt_tokens_total"),
                         ("staticmoe_num_requests_waiting", "vllm:num_requests_waiting"),
                         ("staticmoe_kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
                         ("staticmoe_kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
                         ("staticmoe_e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_count"),
                         ("staticmoe_inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count"),
                         ("staticmoe_request_success_total", "vllm:request_success_total")]:
        assert metric(samples, theirs, model_name="tiny") == metric(samples, ours, model_name="tiny"), theirs
    assert metric(samples, "vllm:generation_tokens_total", model_name="tiny") >= 3
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in api_server.metrics_text()
    assert "vllm:" not in served.metrics_text()  # off by default
