"""`SparseMoeBlock` with group-limited routing and an ungated shared expert against transformers' own MoE blocks of
DeepSeek-V3, DeepSeek-V2 and GLM-4.5 (random weights copied across; float32 on the CPU)."""

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

from model.kernels import GroupedRouting
from model.layers.moe import SparseMoeBlock

H, E, I = 64, 16, 32
BLOCKS = {  # name: (HF config class, HF block, config fields, our routing, renormalize)
    "deepseek_v3": (transformers.DeepseekV3Config, DeepseekV3MoE,
                    dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1),
                    GroupedRouting("sigmoid", True, 4, 2, "top2_sum", 2.5), True),
    "glm4_moe": (transformers.Glm4MoeConfig, Glm4MoeMoE,
                 dict(n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5, n_shared_experts=1),
                 GroupedRouting("sigmoid", True, 1, 1, "top2_sum", 1.5), True),
    "deepseek_v2": (transformers.DeepseekV2Config, DeepseekV2Moe,
                    dict(n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=16.0,
                         n_shared_experts=2),
                    GroupedRouting("softmax", False, 4, 2, "max", 16.0), False),
}


@pytest.mark.parametrize("name", BLOCKS)
@torch.no_grad()
def test_block_matches_transformers(name):
    config_cls, block_cls, fields, routing, renormalize = BLOCKS[name]
    config = config_cls(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=4,
                        num_attention_heads=4, num_key_value_heads=4, **fields)
    torch.manual_seed(0)
    hf = block_cls(config).eval()
    for p in hf.parameters():
        p.normal_(0.0, 0.2)
    if routing.correction_bias:
        hf.gate.e_score_correction_bias.normal_(0.0, 0.1)
    shared_width = I * fields["n_shared_experts"]
    ours = SparseMoeBlock(0, H, E, 4, I, renormalize, shared_expert_intermediate_size=shared_width,
                          shared_expert_gated=False, routing=routing)
    assert ours.shared_expert_gate is None
    ours.gate.weight.copy_(hf.gate.weight)
    if routing.correction_bias:
        ours.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
    ours.experts.gate_up_proj.copy_(hf.experts.gate_up_proj)
    ours.experts.down_proj.copy_(hf.experts.down_proj)
    shared = hf.shared_experts
    ours.shared_expert.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
    ours.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
    x = torch.randn(37, H)
    expected = hf(x[None])[0]
    actual = ours(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    without_shared = ours.experts(x, *ours.route(x))
    assert (expected - without_shared).abs().max() > 1e-2  # the shared expert contributes
