"""YaRN rope scaling against transformers' own rope init functions and rotary modules, for the config shapes the
families that use it ship (Qwen3 long context, DeepSeek-V2/V3 with mscale, gpt-oss with truncate=false), read through
our config parser from the config.json transformers writes; then a Qwen3-MoE model with YaRN end to end."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from model.config import ConfigError, YarnScaling, rope
from model.families import config_from_hf
from model.layers.rotary import RotaryEmbedding, yarn_inv_freq
from model.loader import load_model
from tests.model_fixtures import PagedRunner, hf_greedy, hf_logits, make_hf_model, max_relative_error, save_checkpoint

QWEN3 = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
DEEPSEEK = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
                moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)

CASES = {
    # Qwen3 model cards: factor 4 over the 32k pretraining context, attention_factor derived from factor.
    "qwen3": (QWEN3, dict(max_position_embeddings=131072, rope_theta=1e6, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    # DeepSeek-V3 config.json: mscale == mscale_all_dim, so cos/sin are unscaled and the softmax scale carries it.
    "deepseek_v3": (DEEPSEEK, dict(max_position_embeddings=163840, rope_theta=10000.0, rope_scaling={
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0})),
    # mscale != mscale_all_dim: cos/sin scaled by their ratio.
    "deepseek_mscale_ratio": (DEEPSEEK, dict(max_position_embeddings=163840, rope_theta=10000.0, rope_scaling={
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707})),
    # gpt-oss: no rounding of the ramp bounds.
    "truncate_false": (QWEN3 | dict(head_dim=64), dict(max_position_embeddings=131072, rope_theta=150000.0,
                       rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})),
    "attention_factor_and_betas": (QWEN3, dict(max_position_embeddings=8192, rope_theta=5e5, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
        "beta_slow": 2, "attention_factor": 0.8})),
}


def configs(case: str):
    """(transformers' config, our rope fields parsed from the config.json transformers writes)."""
    base, rope_fields = CASES[case]
    hf = transformers.AutoConfig.for_model(**base, **rope_fields)
    return hf, SimpleNamespace(**rope(hf.to_dict(), default_theta=10000.0),
                               max_position_embeddings=hf.max_position_embeddings)


@pytest.mark.parametrize("case", CASES)
def test_inverse_frequencies_and_attention_factor_match_transformers(case):
    hf, ours = configs(case)
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    rotary_dim = expected_inv_freq.numel() * 2
    actual = yarn_inv_freq(rotary_dim, ours.rope_theta, ours.rope_yarn)
    torch.testing.assert_close(actual, expected_inv_freq, rtol=1e-6, atol=0)
    assert ours.rope_yarn.cos_sin_scale() == pytest.approx(expected_factor, rel=1e-12)
    default = 1.0 / (ours.rope_theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    # the slowest dimensions really are interpolated (divided by the factor), the fastest kept
    assert (actual / default).min() == pytest.approx(1 / ours.rope_yarn.factor, rel=1e-3)
    assert actual[0] == default[0]


@pytest.mark.parametrize("case", ["qwen3", "deepseek_v3", "deepseek_mscale_ratio"])
def test_cos_sin_tables_match_transformers_rotary_module(case):
    hf, ours = configs(case)
    module = (DeepseekV3RotaryEmbedding if hf.model_type == "deepseek_v3" else Qwen3MoeRotaryEmbedding)(hf)
    positions = torch.tensor([0, 1, 7, 4095, 4096, 30000, 131071])
    expected_cos, expected_sin = module(torch.zeros(1, dtype=torch.float32), positions[None])  # [1, N, D]
    ours_rope = RotaryEmbedding(expected_cos.shape[-1], ours.max_position_embeddings, ours.rope_theta,
                                yarn=ours.rope_yarn)
    cos, sin = ours_rope(positions, torch.float32)  # [N, 1, D]
    # inv_freq agrees to a few float32 ulps (the blend is summed in another order), and an angle is position ×
    # inv_freq: allow 4 ulps of inv_freq (<= 1) times the position, plus rounding of cos/sin themselves
    tolerance = (2e-5 + 4 * 2**-24 * positions.float())[:, None]  # [N, 1]
    assert ((cos[:, 0] - expected_cos[0]).abs() <= tolerance).all()
    assert ((sin[:, 0] - expected_sin[0]).abs() <= tolerance).all()
    torch.testing.assert_close(cos[:4, 0], expected_cos[0, :4], rtol=0, atol=1e-5)  # within the original context
    torch.testing.assert_close(sin[:4, 0], expected_sin[0, :4], rtol=0, atol=1e-5)
    assert cos[:, 0].abs().max() == pytest.approx(float(expected_cos.abs().max()), rel=1e-5)  # same cos/sin scale


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_mscale_ratio", "qwen3"])
def test_deepseek_softmax_scale_multiplier_matches_transformers(case):
    hf, ours = configs(case)
    expected = yarn_apply_mscale(hf.rope_parameters, 1.0) if "mscale_all_dim" in hf.rope_parameters else 1.0
    assert ours.rope_yarn.softmax_scale_multiplier() == pytest.approx(expected, rel=1e-12)
    if case == "deepseek_v3":
        assert expected > 1.3  # 0.1·ln 40 + 1 squared: large enough that forgetting it would show


def test_yarn_reading_defaults_as_transformers():
    """factor from the length ratio when null, original_max_position_embeddings from the top level first, null
    betas meaning 32/1, truncate default true."""
    hf, ours = configs("qwen3")
    assert ours.rope_yarn == YarnScaling(factor=4.0, original_max_position_embeddings=32768)
    assert config_from_hf(hf.to_dict(), "x").rope_yarn == ours.rope_yarn  # and the whole parser carries it
    d = hf.to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": None, "beta_fast": None,
                            "original_max_position_embeddings": 16384}
    d["original_max_position_embeddings"] = 32768
    yarn = config_from_hf(d, "x").rope_yarn
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.truncate) == (4.0, 32768, 32, True)


def test_yarn_context_is_the_original_times_the_factor():
    """Qwen3's model cards add yarn (factor 4 over 32768) and leave max_position_embeddings at 40960: the context
    (and rotary table) reaches 131072, as vLLM derives it; a larger max_position_embeddings is kept."""
    d = transformers.AutoConfig.for_model(**QWEN3, max_position_embeddings=40960, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}).to_dict()
    config = config_from_hf(d, "x")
    assert config.max_position_embeddings == 131072 and config.rope_yarn.factor == 4.0
    assert RotaryEmbedding.from_config(config).cos_cache.shape == (131072, 128)
    d["max_position_embeddings"] = 200000
    assert config_from_hf(d, "x").max_position_embeddings == 200000


@pytest.mark.parametrize("edit, pattern", [
    ({"factor": "4"}, r"'factor' must be a positive number"),
    ({"factor": -2.0}, r"'factor' must be a positive number"),
    ({"mscale": float("nan")}, r"rope scaling field 'mscale' must be a finite number"),
    ({"truncate": "no"}, r"'truncate' must be true or false"),
    ({"beta_fast": 1, "beta_slow": 4}, r"beta_fast=1.0 must be >= beta_slow=4.0"),
    ({"original_max_position_embeddings": 0.5}, r"field 'original_max_position_embeddings' must be an integer >= 1"),
    ({"original_max_position_embeddings": True}, r"field 'original_max_position_embeddings' must be an integer >= 1"),
    ({"truncate": 1}, r"rope scaling field 'truncate' must be true or false"),
])
def test_bad_yarn_fields_raise_config_error(edit, pattern):
    d = transformers.AutoConfig.for_model(**CASES["qwen3"][0], **CASES["qwen3"][1]).to_dict()
    d["rope_parameters"] = {**d["rope_parameters"], **edit}
    with pytest.raises(ConfigError, match=pattern):
        config_from_hf(d, "x")


def test_qwen3_moe_with_yarn_matches_hf_end_to_end(tmp_path):
    """A tiny Qwen3-MoE with YaRN (factor 4 over a 64-token original context, attention_factor derived, so cos/sin
    are scaled too): prefill logits within 1e-4 and the greedy continuation identical to generate."""
    prompt = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
    rope = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    hf = make_hf_model("qwen3_moe", seed=11, rope_parameters=rope)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)
    assert ours.config.rope_yarn.factor == 4.0 and ours.config.rope_yarn.cos_sin_scale() > 1.1
    expected = hf_logits(hf, prompt)
    assert max_relative_error(PagedRunner(ours).step({"s": prompt}, all_logits=True)["s"], expected) < 1e-4
    assert PagedRunner(ours).greedy(prompt, 32, chunk=5) == hf_greedy(hf, prompt, 32)
    unscaled = make_hf_model("qwen3_moe", seed=11, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    assert max_relative_error(hf_logits(unscaled, prompt), expected) > 1e-3  # the scaling really matters here
