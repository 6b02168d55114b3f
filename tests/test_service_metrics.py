"""/metrics proves its numbers: per-expert token counts equal the routing recomputed here from the same model and
inputs, FLOPs equal the analytic count for the tokens served, request counters equal what was sent."""

import math

import httpx
import pytest
import torch

from benchmarks.moe_cases import moe_flops_per_token

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.reference_model import full_forward, tiny_reference_model  # noqa: E402
from tests.service_fixtures import metric, parse_metrics, wait_for  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]

# vLLM v1's buckets (vllm/v1/metrics/loggers.py), typed in from its source
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0]
VLLM_REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

REQUESTS = [("The MoE router", 5), ("staticmoe", 9), ("experts and tokens", 3), ("x", 1), ("load", 12)]


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_reference_model()


def greedy_continuation(model, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(full_forward(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def routed_counts(model, fed_tokens: list[int]) -> dict[int, torch.Tensor]:
    """Per MoE layer, tokens per expert: softmax(x @ Wg^T) → top-k, recomputed from each block's input."""
    counts = {}

    def route(block, x):  # x [N, H]
        logits = x.float() @ block.gate.weight.float().T  # [N, E]
        if block.gate.bias is not None:
            logits = logits + block.gate.bias.float()
        chosen = torch.topk(torch.softmax(logits, dim=-1), block.top_k, dim=-1).indices  # [N, k]
        counts[block.layer_idx] = counts.get(block.layer_idx, 0) + torch.bincount(
            chosen.flatten(), minlength=block.num_experts)

    full_forward(model, fed_tokens, route)
    return counts


def expert_counts(samples) -> dict[tuple[int, int], float]:
    return {(int(dict(labels)["layer"]), int(dict(labels)["expert"])): value
            for (name, labels), value in samples.items() if name == "staticmoe_expert_tokens_total"}


def idle(served):
    samples = parse_metrics(served.metrics_text())
    return samples if (metric(samples, "staticmoe_num_requests_running") == 0
                       and metric(samples, "staticmoe_num_requests_waiting") == 0) else None


def test_metrics_after_traffic_match_an_independent_recount(served, tiny_model):
    before = wait_for(lambda: idle(served))
    texts = []
    with httpx.Client(base_url=served.base_url, headers=served.headers, timeout=60) as http:
        for prompt, max_tokens in REQUESTS:
            response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == max_tokens
            texts.append(response.json()["choices"][0]["text"])
    after = wait_for(lambda: idle(served))

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    prompts = [list(p.encode()) for p, _ in REQUESTS]
    # the model sees the prompt, then every generated token but the last one (it is sampled, never fed back)
    fed = [p + greedy_continuation(tiny_model, p, m)[:-1] for p, (_, m) in zip(prompts, REQUESTS)]
    tokens_served = sum(len(f) for f in fed)

    # request counters
    assert delta("staticmoe_prompt_tokens_total") == sum(len(p) for p in prompts)
    assert delta("staticmoe_generation_tokens_total") == sum(m for _, m in REQUESTS)
    assert delta("staticmoe_request_success_total", finished_reason="length") == len(REQUESTS)
    for name in ("staticmoe_e2e_request_latency_seconds_count", "staticmoe_time_to_first_token_seconds_count",
                 "staticmoe_request_queue_time_seconds_count"):
        assert delta(name) == len(REQUESTS), name
    assert delta("staticmoe_inter_token_latency_seconds_count") == sum(m - 1 for _, m in REQUESTS)
    assert delta("staticmoe_e2e_request_latency_seconds_sum") > 0

    cfg = tiny_model.config
    per_token = len(tiny_model.moe_blocks()) * moe_flops_per_token(cfg)
    assert delta("staticmoe_moe_flops_total") == tokens_served * per_token

    # per-expert token counts: each served token adds top_k to its layer; which experts = the router's choice
    expected = {}
    for tokens in fed:
        for layer, counts in routed_counts(tiny_model, tokens).items():
            for expert, count in enumerate(counts.tolist()):
                expected[(layer, expert)] = expected.get((layer, expert), 0) + count
    got_before, got_after = expert_counts(before), expert_counts(after)
    served_counts = {key: got_after[key] - got_before.get(key, 0) for key in got_after}
    assert set(served_counts) == set(expected)
    assert sum(served_counts.values()) == tokens_served * cfg.top_k * len(tiny_model.moe_blocks())
    assert served_counts == expected


def test_every_metric_is_exported_with_plausible_values(served):
    with httpx.Client(base_url=served.base_url, headers=served.headers, timeout=60) as http:
        assert http.post("/v1/completions", json={"prompt": "warm", "max_tokens": 4}).status_code == 200
    samples = wait_for(lambda: idle(served))
    names = {name for name, _ in samples}
    for family in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                   "request_queue_time_seconds", "moe_kernel_seconds"):
        for suffix in ("_bucket", "_sum", "_count"):
            assert f"staticmoe_{family}{suffix}" in names, family + suffix
    for name in ("staticmoe_prompt_tokens_total", "staticmoe_generation_tokens_total",
                 "staticmoe_num_requests_running", "staticmoe_num_requests_waiting", "staticmoe_kv_cache_usage_perc",
                 "staticmoe_request_success_total", "staticmoe_moe_tensor_core_utilization",
                 "staticmoe_moe_flops_total", "staticmoe_expert_tokens_total", "staticmoe_expert_load_imbalance",
                 "staticmoe_expert_idle"):
        assert name in names, name
    for reason in ("stop", "length", "abort"):
        assert ("staticmoe_request_success_total",
                frozenset({("model_name", "tiny"), ("finished_reason", reason)})) in samples
    assert 0 <= metric(samples, "staticmoe_kv_cache_usage_perc") <= 1
    assert 0 <= metric(samples, "staticmoe_moe_tensor_core_utilization") <= 1
    assert metric(samples, "staticmoe_moe_kernel_seconds_count") >= 1  # sampled steps were timed
    experts = 8  # the tiny preset
    for layer in ("0", "1"):
        imbalance = metric(samples, "staticmoe_expert_load_imbalance", layer=layer)
        assert imbalance == 0 or 1 <= imbalance <= experts  # max/mean lies in [1, E] once tokens are in the window
        idle_experts = metric(samples, "staticmoe_expert_idle", layer=layer)
        assert idle_experts == int(idle_experts) and 0 <= idle_experts <= experts


def bucket_bounds(text: str, family: str) -> list[float]:
    samples = parse_metrics(text)
    bounds = {float(dict(labels)["le"]) for (name, labels) in samples if name == f"{family}_bucket"}
    return sorted(b for b in bounds if not math.isinf(b))


def test_histogram_buckets_mirror_vllm(served):
    text = served.metrics_text()
    assert bucket_bounds(text, "staticmoe_time_to_first_token_seconds") == VLLM_TTFT_BUCKETS
    assert bucket_bounds(text, "staticmoe_inter_token_latency_seconds") == VLLM_ITL_BUCKETS
    assert bucket_bounds(text, "staticmoe_e2e_request_latency_seconds") == VLLM_REQUEST_LATENCY_BUCKETS
    assert bucket_bounds(text, "staticmoe_request_queue_time_seconds") == VLLM_REQUEST_LATENCY_BUCKETS


# ---- units: the peak table, the window statistics, the counter bookkeeping -----------------------------------------
@pytest.mark.parametrize("device,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H800", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H20", 148e12), ("NVIDIA A100-SXM4-80GB", None), ("cpu", None)])
def test_dense_bf16_peak_by_device_name(device, peak):
    from service.metrics import dense_bf16_peak_flops

    assert dense_bf16_peak_flops(device) == peak


def test_window_balance_is_max_over_mean_and_counts_idle_experts():
    from service.metrics import window_balance

    assert window_balance([4, 4, 4, 4]) == (1.0, 0)
    assert window_balance([8, 0, 0, 0]) == (4.0, 3)  # mean 2
    assert window_balance([3, 1, 0, 0]) == (3.0, 2)  # mean 1
    assert window_balance([0, 0]) == (0.0, 2)


def test_counters_take_the_increase_between_snapshots_and_utilization_uses_the_peak():
    from model.engine import MoeStatsSnapshot
    from service.metrics import MoeLayout, ServiceMetrics

    metrics = ServiceMetrics("m")
    metrics.configure_moe(MoeLayout(layer_labels=["3", "5"], experts_per_layer=[2, 2], device_name="NVIDIA H100",
                                    peak_flops=1000.0, expert_counters=True))
    metrics.update_moe(MoeStatsSnapshot("NVIDIA H100", 100.0, [(0.5, 200.0), (0.5, 100.0)],
                                        [[1, 2], [3, 0]], [[1, 2], [3, 0]]))
    metrics.update_moe(MoeStatsSnapshot("NVIDIA H100", 250.0, [], [[4, 2], [3, 7]], [[3, 0], [0, 7]]))
    from prometheus_client import generate_latest

    samples = parse_metrics(generate_latest(metrics.registry).decode())
    assert metric(samples, "staticmoe_moe_flops_total") == 250.0
    assert metric(samples, "staticmoe_expert_tokens_total", layer="3", expert="0") == 4
    assert metric(samples, "staticmoe_expert_tokens_total", layer="5", expert="1") == 7
    assert metric(samples, "staticmoe_moe_tensor_core_utilization") == pytest.approx(300.0 / 1.0 / 1000.0)
    assert metric(samples, "staticmoe_moe_kernel_seconds_count") == 2
    assert metric(samples, "staticmoe_expert_idle", layer="3") == 1
    assert metric(samples, "staticmoe_expert_load_imbalance", layer="5") == 2.0


def test_expert_counters_are_off_beyond_8192_series_unless_asked():
    from model.engine import MoeStatsSnapshot
    from prometheus_client import generate_latest
    from service.metrics import EXPERT_SERIES_AUTO_LIMIT, MoeLayout, ServiceMetrics

    assert EXPERT_SERIES_AUTO_LIMIT == 8192
    metrics = ServiceMetrics("m")
    metrics.configure_moe(MoeLayout(layer_labels=["0"], experts_per_layer=[4], device_name="cpu", peak_flops=None,
                                    expert_counters=False))
    metrics.update_moe(MoeStatsSnapshot("cpu", 1.0, [(0.1, 1.0)], [[1, 0, 0, 0]], [[1, 0, 0, 0]]))
    text = generate_latest(metrics.registry).decode()
    assert "staticmoe_expert_tokens_total" not in text
    assert 'staticmoe_expert_idle{layer="0"} 3.0' in text
    assert "staticmoe_moe_tensor_core_utilization 0.0" in text  # unknown peak: no made-up utilization


def test_expert_series_are_built_at_scrape_time_and_never_decrease():
    """The engine thread only hands snapshots over; a scrape exports each counter as the running maximum (the
    engine's totals subtract the pad token's routing and are clamped, so one can dip), and an empty snapshot list
    keeps the previous values."""
    from model.engine import MoeStatsSnapshot
    from prometheus_client import generate_latest
    from service.metrics import MoeLayout, ServiceMetrics

    metrics = ServiceMetrics("m")
    metrics.configure_moe(MoeLayout(layer_labels=["1"], experts_per_layer=[3], device_name="cpu", peak_flops=None,
                                    expert_counters=True))

    def scrape():
        samples = parse_metrics(generate_latest(metrics.registry).decode())
        return ([metric(samples, "staticmoe_expert_tokens_total", layer="1", expert=str(e)) for e in range(3)],
                metric(samples, "staticmoe_expert_idle", layer="1"))

    assert scrape() == ([0, 0, 0], 3)  # before any snapshot: zero tokens, every expert idle
    metrics.update_moe(MoeStatsSnapshot("cpu", 1.0, [], [[5, 0, 2]], [[5, 0, 2]]))
    metrics.update_moe(MoeStatsSnapshot("cpu", 2.0, [], [[6, 1, 2]], [[1, 1, 0]]))  # only the latest counts
    assert scrape() == ([6, 1, 2], 1)
    metrics.update_moe(MoeStatsSnapshot("cpu", 3.0, [], [[4, 1, 9]], []))  # expert 0 dips; no window this time
    assert scrape() == ([6, 1, 9], 1)
    metrics.update_moe(MoeStatsSnapshot("cpu", 4.0, [], [[8, 1, 9]], [[0, 0, 0]]))
    assert scrape() == ([8, 1, 9], 3)
