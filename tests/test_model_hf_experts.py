"""Our op registered as a transformers experts implementation: `set_experts_implementation("staticmoe")` must give
the logits and greedy tokens of transformers' eager experts (CPU: the op's reference path, float32; GPU: our CUDA
kernel in bf16, measured against HF's own bf16 error)."""

import copy

import pytest
import torch
import transformers

import model.hf_experts as hf_experts
from model.kernels import uses_cuda_kernel
from tests.model_fixtures import FAMILIES, assert_bf16_close, hf_greedy, make_hf_model, relative_error

PROMPT = [7, 101, 13, 250, 42, 9, 188, 66, 3, 120, 77]


@pytest.fixture(autouse=True)
def registered():
    assert hf_experts.register_experts_implementation() == "staticmoe"


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls into our op, proving transformers really dispatched to it."""
    calls = []
    real = hf_experts.fused_moe

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_experts, "fused_moe", counting)
    return calls


@torch.no_grad()
def logits(hf_model, device="cpu"):
    return hf_model(torch.tensor([PROMPT], device=device)).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_float32_matches_eager_experts(family, op_calls):
    eager = make_hf_model(family, seed=21)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("staticmoe")
    assert ours.config._experts_implementation == "staticmoe"
    assert relative_error(logits(ours), logits(eager)) < 1e-4
    moe_layers = sum(1 for m in ours.modules() if type(m).__name__.endswith("Experts"))
    assert len(op_calls) == moe_layers and op_calls[0] == (len(PROMPT), 64)
    assert hf_greedy(ours, PROMPT, 16) == hf_greedy(eager, PROMPT, 16)


def test_from_pretrained_with_experts_implementation(tmp_path, op_calls):
    eager = make_hf_model("olmoe", seed=22)
    eager.save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="staticmoe",
                                                             attn_implementation="eager")
    assert relative_error(logits(ours), logits(eager)) < 1e-4 and op_calls


def test_experts_of_another_kind_are_refused():
    config = transformers.AutoConfig.for_model(
        "gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    gpt_oss = transformers.AutoModelForCausalLM.from_config(config)
    gpt_oss.set_experts_implementation("staticmoe")
    with pytest.raises(NotImplementedError, match="GptOssExperts cannot use .*biases.*custom _apply_gate"):
        gpt_oss(torch.tensor([[1, 2, 3]]))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["tiny", "wide"])
def test_gpu_bf16_kernel_within_bf16_tolerance_of_eager(family, size):
    wide = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4) if size == "wide" else {}
    if size == "wide" and family == "qwen3_moe":
        wide["head_dim"] = 32
    reference = make_hf_model(family, seed=23, **wide).cuda()
    golden = logits(reference, "cuda")  # fp32
    eager = copy.deepcopy(reference).to(torch.bfloat16)
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("staticmoe")
    x = torch.zeros(1, reference.config.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert uses_cuda_kernel(x)
    assert_bf16_close(logits(ours, "cuda"), logits(eager, "cuda"), golden)
