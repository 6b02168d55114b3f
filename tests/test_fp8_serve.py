"""FP8 through the service: `--quantization`, the FP8 peak behind the utilization gauge, the precision info metric,
and a real server serving a block-FP8 checkpoint whose greedy tokens equal our FP8 model's in this process."""

import httpx
import pytest
import torch

from model.engine import EngineConfig
from tests.fp8_fixtures import write_fp8_checkpoint
from tests.model_fixtures import PagedRunner
from tests.service_fixtures import ServerProcess, metric, parse_metrics

PROMPTS = [[5, 77, 203, 19, 150, 8], [42, 42, 7, 260, 99, 31, 4]]


# Dense FP8 (e4m3) tensor-core TFLOPS without sparsity, from NVIDIA's H100/H800/H200/H20 datasheets.
@pytest.mark.parametrize("device, peak", [
    ("NVIDIA H100 80GB HBM3", 1979e12), ("NVIDIA H100 PCIe", 1513e12), ("NVIDIA H100 NVL", 1671e12),
    ("NVIDIA H800", 1979e12), ("NVIDIA H200", 1979e12), ("NVIDIA H20", 296e12), ("NVIDIA A100-SXM4-80GB", None)])
def test_dense_fp8_peak_by_device_name(device, peak):
    from service.metrics import dense_peak_flops

    assert dense_peak_flops(device, "fp8") == peak
    if peak is not None:  # twice the bf16 peak on every listed part
        assert dense_peak_flops(device, "bfloat16") == pytest.approx(peak / 2, rel=0.01)


def test_fp8_utilization_uses_the_fp8_peak_and_names_the_precision():
    from prometheus_client import generate_latest

    from model.engine import MoeStatsSnapshot
    from service.metrics import MoeLayout, ServiceMetrics, dense_peak_flops
    from tests.service_fixtures import metric, parse_metrics

    metrics = ServiceMetrics("m")
    peak = dense_peak_flops("NVIDIA H200", "fp8")
    metrics.configure_moe(MoeLayout(layer_labels=["0"], experts_per_layer=[2], device_name="NVIDIA H200",
                                    peak_flops=peak, expert_counters=False, precision="fp8"))
    metrics.update_moe(MoeStatsSnapshot("NVIDIA H200", 1e12, [(1e-3, 1e12)], [[1, 1]], [[1, 1]], precision="fp8"))
    samples = parse_metrics(generate_latest(metrics.registry).decode())
    assert metric(samples, "staticmoe_moe_precision_info", precision="fp8") == 1
    assert metric(samples, "staticmoe_moe_peak_flops") == 1979e12
    assert metric(samples, "staticmoe_moe_tensor_core_utilization") == pytest.approx(1e15 / 1979e12)


def test_quantization_flag_and_environment(monkeypatch):
    from service.cli import build_engine_config, build_parser

    args = build_parser().parse_args(["serve", "--quantization", "fp8"])
    assert build_engine_config(args).quantization == "fp8"
    assert build_engine_config(build_parser().parse_args(["serve"])).quantization == "none"  # EngineConfig's default
    monkeypatch.setenv("STATICMOE_QUANTIZATION", "fp8")
    assert build_engine_config(build_parser().parse_args(["serve"])).quantization == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "int4"])
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        EngineConfig(quantization="int4")


def test_fp8_with_parallelism_is_refused():
    from service.cli import build_parser, parallel_config

    with pytest.raises(SystemExit, match="--quantization fp8 runs on one GPU only"):
        parallel_config(build_parser().parse_args(["serve", "--quantization", "fp8", "--tensor-parallel", "2"]))


def greedy_over_http(base_url: str, model: str, prompt: list[int], n: int) -> str:
    """The text of `n` greedy tokens (the API returns text, not ids)."""
    response = httpx.post(base_url + "/v1/completions", timeout=300, json=dict(
        model=model, prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == n
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return write_fp8_checkpoint("qwen3_moe", tmp_path_factory.mktemp("serve_fp8"), seed=9)[0]


def test_server_serves_a_block_fp8_checkpoint(fp8_checkpoint):
    from model.loader import load_model

    ours, tokenizer = load_model(str(fp8_checkpoint), dtype=torch.float32)
    expected = [tokenizer.decode(PagedRunner(ours).greedy(p, 8)) for p in PROMPTS]
    assert any(expected)
    server = ServerProcess(["--model", str(fp8_checkpoint), "--device", "cpu", "--max-model-len", "64",
                            "--served-model-name", "fp8"])
    try:
        server.wait_healthy()
        assert [greedy_over_http(server.base_url, "fp8", p, 8) for p in PROMPTS] == expected
        samples = parse_metrics(server.metrics_text())
        assert metric(samples, "staticmoe_moe_precision_info", precision="fp8") == 1
    finally:
        server.stop()
