"""Parity with HF transformers on unusual but legal config values real checkpoints use (or may), beyond the tiny
configs of tests/test_model_parity.py: each a tiny random model built and saved by transformers, loaded by our
loader (float32, CPU), giving HF's logits (1e-4 relative, prefill then padded decode steps) and `generate`'s greedy
continuation. Configs we cannot compute as transformers does are refused at load with an error naming the field."""

import pytest
import torch

from model.config import ConfigError
from model.loader import load_model
from tests.deepseek_fixtures import make_deepseek_model
from tests.model_fixtures import assert_paged_matches_hf, make_hf_model, save_checkpoint

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
DS_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)

# (family or "deepseek:<variant>", config overrides)
SOUND = {
    # Qwen-MoE: MoE only every second layer (decoder_sparse_step), all-dense, an mlp_only_layers entry past the
    # last layer, top-1 and top-all routing, tied embeddings, head_dim != hidden/heads, MQA, an odd rope_theta
    "qwen3-sparse-step-2": ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[])),
    "qwen3-sparse-step-3-and-mlp-only": ("qwen3_moe", dict(decoder_sparse_step=3, mlp_only_layers=[0])),
    "qwen3-all-dense": ("qwen3_moe", dict(decoder_sparse_step=4, mlp_only_layers=[])),
    "qwen3-mlp-only-past-last": ("qwen3_moe", dict(mlp_only_layers=[1, 7])),
    "qwen3-top-all-not-renormalised": ("qwen3_moe", dict(num_experts_per_tok=8, norm_topk_prob=False)),
    "qwen3-tied-head-dim-32-attention-bias": ("qwen3_moe", dict(tie_word_embeddings=True, head_dim=32,
                                                                 attention_bias=True)),
    "qwen3-mqa-yarn-attention-factor": ("qwen3_moe", dict(num_key_value_heads=1, rope_parameters=dict(
        DS_YARN, attention_factor=0.8))),
    "qwen2-top-1-renormalised-step-2": ("qwen2_moe", dict(num_experts_per_tok=1, norm_topk_prob=True,
                                                          decoder_sparse_step=2)),
    "qwen2-no-qkv-bias-theta-eps": ("qwen2_moe", dict(qkv_bias=False, rope_theta=1234.5, rms_norm_eps=0.3)),
    "qwen2-linear-rope-tied": ("qwen2_moe", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=10000.0))),
    # Mixtral: a window shorter than the prompt, top-1, top-all, head_dim 32, tiny rope_theta
    "mixtral-window-4-top-1": ("mixtral", dict(sliding_window=4, num_experts_per_tok=1)),
    "mixtral-top-all-head-dim-32-theta-5": ("mixtral", dict(num_experts_per_tok=4, head_dim=32, rope_theta=5.0)),
    # OLMoE: no clipping, clipping almost everything, renormalised top-1, attention biases, no GQA, tied
    "olmoe-no-clip-renormalised-top-1": ("olmoe", dict(clip_qkv=None, norm_topk_prob=True, num_experts_per_tok=1)),
    "olmoe-clip-0.1-bias-mha-tied": ("olmoe", dict(clip_qkv=0.1, attention_bias=True, num_key_value_heads=4,
                                                    tie_word_embeddings=True)),
    # GLM-4.5: no dense layer, all dense, no q/k norm (Air), full and quarter rotary, one group, top-1, top-all,
    # not renormalised, MQA, a large eps, YaRN on the rotated part
    "glm-no-dense-no-qk-norm-full-rotary": ("glm4_moe", dict(first_k_dense_replace=0, use_qk_norm=False,
                                                            partial_rotary_factor=1.0)),
    "glm-all-dense": ("glm4_moe", dict(first_k_dense_replace=5)),
    "glm-quarter-rotary-no-bias-mqa": ("glm4_moe", dict(partial_rotary_factor=0.25, attention_bias=False,
                                                       num_key_value_heads=1)),
    "glm-top-1-one-group-not-renormalised": ("glm4_moe", dict(num_experts_per_tok=1, n_group=1, topk_group=1,
                                                              norm_topk_prob=False, rms_norm_eps=0.5)),
    "glm-top-all-tied-yarn": ("glm4_moe", dict(num_experts_per_tok=8, n_group=1, topk_group=1,
                                               tie_word_embeddings=True, rope_parameters=dict(
                                                   DS_YARN, partial_rotary_factor=0.5))),
    # gpt-oss: all full, all sliding, full first, YaRN (truncate false), top-1, top-all, no biases, tied, MQA
    "gpt-oss-all-full-top-1": ("gpt_oss", dict(layer_types=["full_attention"] * 3, num_experts_per_tok=1)),
    "gpt-oss-all-sliding-top-all-no-bias": ("gpt_oss", dict(layer_types=["sliding_attention"] * 3,
                                                            num_experts_per_tok=8, attention_bias=False)),
    "gpt-oss-full-first-yarn-tied-mqa": ("gpt_oss", dict(
        layer_types=["full_attention", "sliding_attention", "full_attention"], tie_word_embeddings=True,
        num_key_value_heads=1, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                    original_max_position_embeddings=16, truncate=False))),
    # DeepSeek: no dense layer, two, top-1, top-all, tied, attention biases, q_lora_rank on V2-Lite, greedy with
    # n_group set (ignored), 8 groups keeping 3, YaRN with only mscale or only mscale_all_dim, linear rope
    "deepseek-v2-no-dense-top-1-tied": ("deepseek:v2-lite", dict(first_k_dense_replace=0, num_experts_per_tok=1,
                                                                 tie_word_embeddings=True)),
    "deepseek-v2-two-dense-top-all-bias-q-lora": ("deepseek:v2-lite", dict(
        first_k_dense_replace=2, num_experts_per_tok=8, attention_bias=True, q_lora_rank=24)),
    "deepseek-v2-greedy-ignores-groups-linear": ("deepseek:v2-lite", dict(n_group=4, topk_group=1, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "deepseek-v2-8-groups-keep-3-mscale-only": ("deepseek:v2-grouped-yarn", dict(n_group=8, topk_group=3,
                                                                                 rope_parameters=dict(DS_YARN, mscale=1.0))),
    "deepseek-v2-yarn-mscale-all-dim-only": ("deepseek:v2-grouped-yarn", dict(rope_parameters=dict(
        DS_YARN, mscale_all_dim=1.0))),
    "deepseek-v3-no-dense-one-group-top-1": ("deepseek:v3-plain", dict(first_k_dense_replace=0, n_group=1,
                                                                       topk_group=1, num_experts_per_tok=1)),
    "deepseek-v3-top-all-tied-bias": ("deepseek:v3-plain", dict(num_experts_per_tok=8, n_group=1, topk_group=1,
                                                                tie_word_embeddings=True, attention_bias=True)),
    "deepseek-v3-yarn-factor-40-half-split-rope": ("deepseek:v3-yarn", dict(rope_interleave=False, rope_parameters=dict(
        DS_YARN, factor=40.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=16, beta_slow=2))),
}


def build(spec: str, overrides: dict):
    if spec.startswith("deepseek:"):
        return make_deepseek_model(spec.removeprefix("deepseek:"), **overrides)
    return make_hf_model(spec, **overrides)


def load_ours(hf, tmp_path):
    return load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)[0]


@pytest.mark.parametrize("case", SOUND)
def test_unusual_config_matches_hf(case, tmp_path):
    hf = build(*SOUND[case])
    assert_paged_matches_hf(load_ours(hf, tmp_path), hf, PROMPT)


@pytest.mark.parametrize("variant", ["v2-lite", "v3-plain"])
def test_deepseek_linear_rope_with_mscale_all_dim_is_refused(variant, tmp_path):
    """DeepSeek multiplies its softmax scale by mscale(factor, mscale_all_dim)² under any rope scaling, linear too
    (transformers: off by 0.14-0.43 relative in the logits here); we apply it with YaRN only, so refuse the rest."""
    hf = build(f"deepseek:{variant}", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0,
                                                                mscale_all_dim=0.707)))
    with pytest.raises(ConfigError, match="mscale_all_dim"):
        load_ours(hf, tmp_path)


def test_deepseek_v2_mlp_bias_is_refused_by_name(tmp_path):
    """transformers gives V2's dense and shared MLPs biases with mlp_bias; ours have none: the refusal names the
    field (it named the checkpoint's bias tensors the model did not use)."""
    hf = build("deepseek:v2-lite", dict(mlp_bias=True))
    with pytest.raises(ConfigError, match="mlp_bias"):
        load_ours(hf, tmp_path)


@pytest.mark.parametrize("limit", [1.0, 10.0])
def test_gpt_oss_swiglu_limit_other_than_7_is_refused(limit, tmp_path):
    """OpenAI's gpt-oss clamps at config.swiglu_limit; transformers (and our experts) always at 7.0, so a model
    trained with another limit would be run wrong, silently."""
    hf = build("gpt_oss", dict(swiglu_limit=limit))
    with pytest.raises(ConfigError, match="swiglu_limit"):
        load_ours(hf, tmp_path)


def test_gpt_oss_swiglu_limit_7_loads(tmp_path):
    hf = build("gpt_oss", dict(swiglu_limit=7.0))
    assert_paged_matches_hf(load_ours(hf, tmp_path), hf, PROMPT)
