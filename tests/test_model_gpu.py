"""On the H100: our models in bf16 through the CUDA MoE kernel (gpt_oss: its activation and bias epilogues, sinks and
windows in the Triton attention kernels), against transformers' eager experts (bf16 tolerance
measured by HF's own bf16 error from fp32 logits), and a decode step captured in a CUDA graph and replayed."""

import copy

import pytest
import torch

from model.kernels import uses_cuda_kernel
from model.loader import load_model
from tests.model_fixtures import (PARITY_FAMILIES, PagedRunner, assert_bf16_close, assert_decode_graph_matches_eager,
                                  hf_logits, make_hf_model, save_checkpoint)

pytestmark = pytest.mark.gpu

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99, 31, 4, 180, 222]
# "wide": hidden and expert sizes large enough for the kernel's real tile shapes.
SIZES = {"tiny": {}, "wide": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4)}
WIDE_EXPERTS = {"qwen3_moe": dict(moe_intermediate_size=256, head_dim=64), "qwen2_moe": dict(moe_intermediate_size=256),
                "mixtral": dict(intermediate_size=256), "olmoe": dict(intermediate_size=256),
                "glm4_moe": dict(moe_intermediate_size=256, intermediate_size=256, head_dim=64),
                # the swiglu_oai + bias epilogues, sinks in both Triton kernels, window 5 < the prompt
                "gpt_oss": dict(intermediate_size=256, head_dim=64)}


def overrides(family, size):
    return {**SIZES[size], **(WIDE_EXPERTS[family] if size == "wide" else {})}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_bf16_logits_through_our_kernel(family, size, tmp_path):
    hf = make_hf_model(family, seed=31, **overrides(family, size))
    directory = save_checkpoint(hf, tmp_path)
    hf = hf.cuda()
    golden = hf_logits(hf, PROMPT)  # fp32 on the GPU
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), PROMPT)  # eager experts
    ours, _ = load_model(str(directory), dtype=torch.bfloat16, device="cuda")
    probe = torch.zeros(1, ours.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert uses_cuda_kernel(probe)
    runner = PagedRunner(ours, block_size=16)
    prefill = runner.step({"s": PROMPT[:9]}, all_logits=True)["s"]
    rest = [runner.step({"s": [t]})["s"] for t in PROMPT[9:]]  # decode path
    assert_bf16_close(torch.cat([prefill, *rest]), hf_bf16, golden)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_decode_step_in_a_cuda_graph(family, tmp_path):
    """Capture one padded decode step (attention, MoE op, expert counters) and replay it with new inputs: the
    logits equal an eager run of the same steps."""
    hf = make_hf_model(family, seed=32, **overrides(family, "wide"))
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.bfloat16, device="cuda")
    assert_decode_graph_matches_eager(ours, {"a": PROMPT, "b": PROMPT[:5], "c": PROMPT[2:13]})
