"""Parity of deepseek_v2 / deepseek_v3 with transformers (issue 23.5): tiny random checkpoints written by
transformers (tests/deepseek_fixtures.py: with and without q_lora_rank, greedy and grouped routing, YaRN with
mscale, both rope layouts), loaded by our loader, give logits within 1e-4 (fp32, CPU) and the greedy continuation
of `generate`, through the paged model (tests/test_model_parity.py runs its checks on every variant), the engine
(chunked prefill, preemption) and over HTTP. Plus: the latent
cache shape, the MTP layer skipped at load, and the bf16 GPU runs (Triton MLA decode in the model)."""

import copy
import random

import httpx
import pytest
import torch

from model.checkpoint import CheckpointError
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.loader import load_model
from tests.deepseek_fixtures import TINY_DEEPSEEK, make_deepseek_model
from tests.engine_fixtures import GREEDY, run, tokens_of
from tests.model_fixtures import (
    PagedRunner, assert_bf16_close, assert_decode_graph_matches_eager, completion_text, hf_greedy, hf_logits,
    make_hf_model,
    rewrite_safetensors, save_checkpoint,
)
from tests.service_fixtures import ServerProcess

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
VARIANTS = list(TINY_DEEPSEEK)


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
    hf = make_deepseek_model(request.param, seed=VARIANTS.index(request.param))
    directory = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    ours, _ = load_model(str(directory), dtype=torch.float32)
    return hf, ours, directory


def test_config_and_latent_cache(pair):
    hf, ours, _ = pair
    c, hc = ours.config, hf.config
    assert c.mla.kv_lora_rank == hc.kv_lora_rank and c.mla.q_lora_rank == hc.q_lora_rank
    assert c.head_dim == hc.qk_rope_head_dim and c.dense_layers == (0,)
    assert c.shared_expert_intermediate_size == hc.n_shared_experts * hc.moe_intermediate_size
    assert ours.kv_cache_shape(7, 4) == (3, 7, 4, hc.kv_lora_rank + hc.qk_rope_head_dim)


# Logits, chunked prefill, padded decode, mixed batches and greedy parity of every variant: tests/test_model_parity.py


@pytest.mark.parametrize("variant", ["v2-lite", "v3-yarn"])
def test_engine_greedy_matches_generate_with_chunking_and_preemption(variant, tmp_path):
    hf = make_deepseek_model(variant, seed=11)
    directory = save_checkpoint(hf, tmp_path / "ckpt")
    engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=40,
                                    max_num_batched_tokens=24, max_num_seqs=6))
    rng = random.Random(2)
    requests = {f"h{i}": ([rng.randrange(320) for _ in range(rng.randint(8, 40))],
                          SamplingParams(max_tokens=32, **GREEDY)) for i in range(5)}
    outputs = run(engine, requests)
    assert engine.stats().num_preemptions_total > 0, "the KV cache was not small enough to preempt"
    for rid, (prompt, _) in requests.items():
        assert tokens_of(outputs[rid]) == hf_greedy(hf, prompt, 32), rid


def greedy_text_over_http(base_url: str, prompt: list[int], n: int) -> str:
    response = httpx.post(base_url + "/v1/completions", timeout=300, json=dict(
        model="ds", prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == n
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("variant", ["v2-grouped-yarn", "v3-yarn"])
def test_greedy_over_http_matches_generate(variant, tmp_path):
    hf = make_deepseek_model(variant, seed=12)
    directory = save_checkpoint(hf, tmp_path / "ckpt")
    _, tokenizer = load_model(str(directory), dtype=torch.float32)
    prompts = [PROMPT, [42, 42, 7, 260, 99, 31, 4]]
    expected = [completion_text(tokenizer, p, hf_greedy(hf, p, 32)) for p in prompts]
    assert any(expected)
    server = ServerProcess(["--model", str(directory), "--device", "cpu", "--dtype", "float32",
                            "--max-model-len", "128", "--served-model-name", "ds"])
    try:
        server.wait_healthy()
        assert [greedy_text_over_http(server.base_url, p, 32) for p in prompts] == expected
    finally:
        server.stop()


def test_mtp_layer_is_skipped_at_load_but_other_families_refuse_extra_layers(tmp_path):
    hf = make_deepseek_model("v3-plain", seed=4)
    directory = save_checkpoint(hf, tmp_path / "v3")
    before = PagedRunner(load_model(str(directory), dtype=torch.float32)[0]).step({"s": PROMPT})["s"]
    rewrite_safetensors(directory / "model.safetensors", lambda t: t.update({
        "model.layers.3.eh_proj.weight": torch.randn(64, 128),  # V3's MTP layer: index num_layers
        "model.layers.3.self_attn.kv_b_proj.weight": torch.randn(4 * 44, 32)}))
    after = PagedRunner(load_model(str(directory), dtype=torch.float32)[0]).step({"s": PROMPT})["s"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    qwen = save_checkpoint(make_hf_model("qwen3_moe"), tmp_path / "qwen")
    rewrite_safetensors(qwen / "model.safetensors",
                        lambda t: t.update({"model.layers.3.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match="does not use"):
        load_model(str(qwen), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_on_gpu_within_transformers_own_bf16_error(variant, tmp_path):
    """bf16 on the GPU: Triton MLA decode (absorbed) and the CUDA MoE kernel, against HF's own bf16 error; the wide
    variant has the real kv_lora_rank 512 and rope 64 so the Triton kernel (powers of two >= 16) runs."""
    hf = make_deepseek_model(variant, seed=31, hidden_size=256, kv_lora_rank=512, qk_rope_head_dim=64,
                             qk_nope_head_dim=64, v_head_dim=64, moe_intermediate_size=128, intermediate_size=256)
    directory = save_checkpoint(hf, tmp_path)
    hf = hf.cuda()
    prompt = PROMPT + [31, 4, 180, 222]
    golden = hf_logits(hf, prompt)
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), prompt)
    ours, _ = load_model(str(directory), dtype=torch.bfloat16, device="cuda")
    runner = PagedRunner(ours, block_size=16)
    assert_bf16_close(runner.prefill_then_decode(prompt, 9), hf_bf16.cpu(), golden.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["v2-lite", "v3-yarn"])
def test_decode_step_in_a_cuda_graph(variant, tmp_path):
    """A padded decode step (absorbed MLA through the Triton kernel, the MoE op) captured once and replayed with new
    inputs equals eager runs of the same steps, and leaves the same latent cache."""
    hf = make_deepseek_model(variant, seed=32, hidden_size=256, kv_lora_rank=512, qk_rope_head_dim=64,
                             moe_intermediate_size=128, intermediate_size=256)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.bfloat16, device="cuda")
    assert_decode_graph_matches_eager(ours, {"a": PROMPT, "b": PROMPT[:5], "c": PROMPT[2:13]})


