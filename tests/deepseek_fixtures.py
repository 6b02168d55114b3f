"""Tiny random DeepSeek-V2/V3 checkpoints written by transformers, in the variants the parity tests cover: with and
without q_lora_rank, greedy and group-limited routing, YaRN rope scaling (with DeepSeek's mscale / mscale_all_dim),
V3's interleaved and half-split rope, a dense first layer and shared experts."""

import torch
import transformers

from tests.model_fixtures import VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None,
               bos_token_id=None, pad_token_id=None, intermediate_size=48, moe_intermediate_size=16,
               n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32,
               qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
TINY_DEEPSEEK = {
    # V2-Lite's layout: no q_lora_rank, greedy softmax top-k, 2 shared experts
    "v2-lite": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy", n_shared_experts=2),
    # V2's: q_lora_rank, group-limited greedy routing, routed_scaling_factor, YaRN
    "v2-grouped-yarn": dict(model_type="deepseek_v2", q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                            topk_group=2, routed_scaling_factor=1.5, n_shared_experts=1, rope_parameters=dict(YARN)),
    # V3's: q_lora_rank, sigmoid + correction bias, groups by best-two sum, YaRN, interleaved rope
    "v3-yarn": dict(model_type="deepseek_v3", q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5, n_shared_experts=1, rope_parameters=dict(YARN, mscale=1.0,
                                                                                         mscale_all_dim=0.8)),
    # V3 without q_lora_rank, half-split rope, no renormalisation, plain rope
    "v3-plain": dict(model_type="deepseek_v3", q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=False,
                     routed_scaling_factor=1.0, n_shared_experts=2, rope_interleave=False),
}


def deepseek_config(variant: str, **overrides) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(**{**_COMMON, **TINY_DEEPSEEK[variant], **overrides})


@torch.no_grad()
def make_deepseek_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 HF model with every parameter random, the routers' correction biases too (so the choice and the
    weights really differ in V3)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(deepseek_config(variant, **overrides),
                                                          attn_implementation="eager")
    for name, p in model.named_parameters():
        p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn_like(b))
    return model.eval()
