"""Defects found in /metrics by a hunt against a real server (tiny model on the CPU), one test each."""

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.api_fixtures import api, api_server  # noqa: E402, F401
from tests.browser_fixtures import render_in_chromium  # noqa: E402
from tests.service_fixtures import metric, parse_metrics, served, wait_for  # noqa: E402, F401

# regex "ab" with allowed_token_ids [98] ("b"): no token satisfies both, so the engine ends the choice with
# finish_reason "error" (a 400 no_allowed_token; in-band when streamed), see tests/test_service_structured.py
NO_ALLOWED_TOKEN = {"prompt": "x", "max_tokens": 5, "temperature": 0, "structured_outputs": {"regex": "ab"},
                    "allowed_token_ids": [98]}


def idle_samples(server):
    samples = parse_metrics(server.metrics_text())
    return samples if (metric(samples, "staticmoe_num_requests_running") == 0
                       and metric(samples, "staticmoe_num_requests_waiting") == 0) else None


def test_a_request_ending_with_an_error_is_counted_in_request_success(served):
    """A choice that ends with finish_reason "error" was in the e2e histogram (and the prompt/generation token
    histograms) but in no staticmoe_request_success_total series: errors were invisible to an operator, and
    Σ request_success fell short of the e2e count. vLLM exports finished_reason="error" too."""
    before = wait_for(lambda: idle_samples(served))
    with httpx.Client(base_url=served.base_url, headers=served.headers, timeout=120) as http:
        assert http.post("/v1/completions", json=NO_ALLOWED_TOKEN).status_code == 400
        with http.stream("POST", "/v1/completions", json={**NO_ALLOWED_TOKEN, "stream": True}) as stream:
            assert stream.status_code == 200
            assert any('"no_allowed_token"' in line for line in stream.iter_lines())
    after = wait_for(lambda: idle_samples(served))

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("staticmoe_request_success_total", finished_reason="error") == 2
    assert delta("staticmoe_request_success_total") == delta("staticmoe_e2e_request_latency_seconds_count") == 2
    # the prompts were prefilled: the prefill-token counter agrees with the per-request histogram's sum
    assert delta("staticmoe_prompt_tokens_total") == delta("staticmoe_request_prompt_tokens_sum") > 0


def test_the_error_series_exists_before_any_error():
    """Like stop/length/abort, the series is there at 0 from the start, so rate() sees the first error."""
    from service.metrics import ServiceMetrics

    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(ServiceMetrics("m").registry).decode())}
    reasons = {s.labels["finished_reason"]: s.value for s in families["staticmoe_request_success"].samples
               if s.name == "staticmoe_request_success_total"}
    assert reasons == {"stop": 0.0, "length": 0.0, "abort": 0.0, "error": 0.0}


def test_vllm_names_include_the_prefix_cache_counters(api, api_server):
    """--vllm-metric-names promises every staticmoe_ series that mirrors vLLM's under its vllm: name. The prefix
    cache counters (vLLM's vllm:prefix_cache_queries/hits, the hit-rate panel of vLLM dashboards) were missing:
    added after the mirror's list, and never put on it."""
    prompt = "a prompt long enough to fill several KV blocks of sixteen tokens, sent twice " * 2
    for _ in range(2):  # the second one finds the first one's full blocks cached
        api.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    samples = wait_for(lambda: idle_samples(api_server))
    hits = metric(samples, "staticmoe_prefix_cache_hits_total", model_name="tiny")
    queries = metric(samples, "staticmoe_prefix_cache_queries_total", model_name="tiny")
    assert hits >= 16 and queries >= 2 * len(prompt)  # the byte tokenizer: one token per character
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert ("vllm:" + name, frozenset({("model_name", "tiny")})) in samples, name
        assert metric(samples, "vllm:" + name, model_name="tiny") == metric(samples, "staticmoe_" + name), name


def test_the_queue_full_series_exists_before_the_first_429(served):
    """staticmoe_requests_rejected_total{reason="queue_full"} only appeared with the first 429, at 1: rate() and
    increase() need two samples of a series, so an alert on them missed the first burst of refusals (and a server
    that refused once, in one burst, never showed any)."""
    from service.metrics import ServiceMetrics

    fresh = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(
        generate_latest(ServiceMetrics("m").registry).decode()) for s in f.samples}
    assert fresh[("staticmoe_requests_rejected_total", (("reason", "queue_full"),))] == 0.0
    samples = parse_metrics(served.metrics_text())
    assert ("staticmoe_requests_rejected_total", frozenset({("reason", "queue_full")})) in samples


# The dashboard's elements these tests read: the real page in headless Chromium, fed the given /metrics texts.
SHOWN = ("tensor-util", "moe-tflops")


def test_the_dashboard_names_the_peak_the_utilization_is_over(tmp_path):
    """With FP8 experts the utilization is over the FP8 peak (twice the bf16 one), but the dashboard titled it
    "÷ dense bf16 peak" whatever the precision: an operator read a number half of what it meant against bf16."""
    from model.engine import MoeStatsSnapshot
    from service.metrics import MoeLayout, ServiceMetrics, dense_peak_flops

    metrics = ServiceMetrics("m")
    peak = dense_peak_flops("NVIDIA H100 80GB HBM3", "fp8")
    metrics.configure_moe(MoeLayout(layer_labels=["0"], experts_per_layer=[2], device_name="NVIDIA H100 80GB HBM3",
                                    peak_flops=peak, expert_counters=True, precision="fp8"))
    first = generate_latest(metrics.registry).decode()
    metrics.update_moe(MoeStatsSnapshot("NVIDIA H100 80GB HBM3", 4e12, [(0.01, 0.25 * peak * 0.01)],
                                        [[3, 1]], [[3, 1]]))
    shown = render_in_chromium(tmp_path, first, generate_latest(metrics.registry).decode(), element_ids=SHOWN)
    assert shown["tensor-util"] == "25.0 %"
    assert "fp8 peak" in shown["moe-tflops"], shown["moe-tflops"]
    from service.dashboard import dashboard_page

    assert "bf16" not in dashboard_page()  # no title or note that names one precision's peak


def test_the_dashboard_does_not_show_an_untimed_server_as_zero_utilization(tmp_path):
    """With --no-expert-metrics (or a parallel model) no MoE step is timed, so the utilization gauge stays 0 while
    tokens are served and the device's peak is known: the dashboard showed "0.0 %", a measurement that was never
    made. FLOPs served with no timed step is what tells it."""
    from model.engine import MoeStatsSnapshot
    from service.metrics import MoeLayout, ServiceMetrics

    def scrapes(timed):
        metrics = ServiceMetrics("m")
        metrics.configure_moe(MoeLayout(layer_labels=["0"], experts_per_layer=[2], device_name="NVIDIA H100",
                                        peak_flops=1e12, expert_counters=False, expert_window_metrics=False))
        first = generate_latest(metrics.registry).decode()
        metrics.update_moe(MoeStatsSnapshot("NVIDIA H100", 5e9, [(0.01, 5e9)] if timed else [], [], []))
        return first, generate_latest(metrics.registry).decode()

    untimed = render_in_chromium(tmp_path / "untimed", *scrapes(timed=False), element_ids=SHOWN)
    assert "%" not in untimed["tensor-util"], untimed["tensor-util"]
    assert "not timed" in untimed["moe-tflops"], untimed["moe-tflops"]
    # the same traffic, timed: 5e9 / 0.01 s of 1e12
    timed = render_in_chromium(tmp_path / "timed", *scrapes(timed=True), element_ids=SHOWN)
    assert timed["tensor-util"] == "50.0 %" and "not timed" not in timed["moe-tflops"]
