"""The supported MoE families, one row each by HF `model_type`: how its config.json reads into a `ModelConfig` (its
MoE and attention options) and how its checkpoint keys rename to the common layout. The decoder
(model/decoder.py) is generic: families differ only in ModelConfig fields and checkpoint key names, so adding a
family is adding a row here (and, to run it without a download, a preset in model/presets.py).
"""

from dataclasses import dataclass
from typing import Callable

from model.config import ConfigError, ModelConfig, common_fields, flag, integer, number, require
from model.mla_config import mla_from_hf


@dataclass(frozen=True)
class Family:
    summary: str
    fields: Callable[[dict, dict], dict]  # (config.json, the common fields) -> the family's other ModelConfig fields
    rms_norm_eps: float  # transformers' defaults, for a config.json that leaves them out
    rope_theta: float
    checkpoint_renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied to checkpoint keys
    # How routed experts are stored: "concatenated" = [E, 2I, H] gate rows then up rows, [E, H, I] (transformers 5
    # in memory, our layout) or per-expert 2-D keys; "gpt_oss" = [E, H, 2I] with gate and up columns interleaved,
    # [E, I, H], biases [E, 2I] interleaved (converted at load, model/weight_map.py).
    expert_layout: str = "concatenated"


def _dense_layers(d: dict, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE layers that keep a dense MLP: listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = integer(d, "decoder_sparse_step", 1, minimum=0) or 1
    only = set(d.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)


def _qwen_moe(d: dict, common: dict) -> dict:
    """The MoE fields qwen2_moe and qwen3_moe configs spell the same way."""
    if flag(d, "use_sliding_window", False):
        raise ConfigError(f"use_sliding_window=true is not supported for {d['model_type']}")
    return dict(
        num_experts=require(d, "num_experts", "num_local_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "moe_intermediate_size"),
        intermediate_size=d.get("intermediate_size") or 0,
        norm_topk_prob=flag(d, "norm_topk_prob", False),
        dense_layers=_dense_layers(d, common["num_layers"]),
    )


def _qwen3_moe(d: dict, common: dict) -> dict:
    bias = flag(d, "attention_bias", False)
    return dict(**_qwen_moe(d, common), qkv_bias=bias, o_bias=bias, qk_norm="per_head")


def _qwen2_moe(d: dict, common: dict) -> dict:
    return dict(**_qwen_moe(d, common), qkv_bias=flag(d, "qkv_bias", True),
                shared_expert_intermediate_size=integer(d, "shared_expert_intermediate_size", 0, minimum=0))


def _mixtral(d: dict, common: dict) -> dict:
    return dict(
        num_experts=require(d, "num_local_experts", "num_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=True,  # Mixtral always renormalises its top-k
        sliding_window=d.get("sliding_window"),
    )


def _olmoe(d: dict, common: dict) -> dict:
    if common["head_dim"] * common["num_heads"] != common["hidden_size"]:
        raise ConfigError("OLMoE's full-width q/k norm needs head_dim * num_attention_heads == hidden_size")
    bias = flag(d, "attention_bias", False)
    return dict(
        num_experts=require(d, "num_experts", "num_local_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=flag(d, "norm_topk_prob", False),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=number(d, "clip_qkv", None, positive=True),  # null: no clipping
    )


def _deepseek_moe(d: dict, common: dict) -> dict:
    """What deepseek_v2 and deepseek_v3 configs spell the same way: MLA attention (head_dim is the rope width the
    rotary tables are built for), routed experts beside one ungated shared MLP of n_shared_experts x
    moe_intermediate_size columns, the first first_k_dense_replace layers dense. transformers' defaults fill fields a
    config leaves out (`defaults`)."""
    rope_spec = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    # DeepSeek multiplies its softmax scale by mscale(factor, mscale_all_dim)² under any non-default rope scaling
    # (transformers' yarn_apply_mscale, DeepSeek's own code alike); our MLA applies it with YaRN only
    if common.get("rope_linear_factor", 1.0) > 1 and rope_spec.get("mscale_all_dim"):
        raise ConfigError("rope scaling field 'mscale_all_dim' is supported for deepseek only with rope type 'yarn', "
                          "not 'linear'")
    if (d.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(f"moe_layer_freq={d['moe_layer_freq']} is not supported (only 1: every layer after the "
                          f"first_k_dense_replace dense ones is MoE)")
    mla = mla_from_hf(d)
    moe_inter = require(d, "moe_intermediate_size")
    first_dense = d.get("first_k_dense_replace", 3 if d["model_type"] == "deepseek_v3" else 0) or 0
    n_shared = integer(d, "n_shared_experts", 1 if d["model_type"] == "deepseek_v3" else 2, minimum=0)
    return dict(
        head_dim=mla.qk_rope_head_dim,
        num_kv_heads=common["num_heads"],  # MLA has no K/V head grouping; num_key_value_heads is not used
        mla=mla,
        num_experts=require(d, "n_routed_experts", "num_local_experts", "num_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=moe_inter,
        intermediate_size=d.get("intermediate_size") or 0,
        dense_layers=tuple(range(min(first_dense, common["num_layers"]))),
        shared_expert_intermediate_size=n_shared * moe_inter,
        shared_expert_gated=False,
        mtp_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,  # V3's, skipped at load
    )


def _deepseek_v2(d: dict, common: dict) -> dict:
    method = d.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"topk_method={method!r} is not supported for deepseek_v2 (greedy, group_limited_greedy)")
    if flag(d, "mlp_bias", False):  # transformers' V2 MLPs (dense and shared) then carry biases; no V2 sets it
        raise ConfigError("mlp_bias=true is not supported for deepseek_v2 (dense and shared MLPs have no biases here)")
    # transformers' DeepseekV2TopkRouter never renormalises; no published V2 sets it
    if flag(d, "norm_topk_prob", False):
        raise ConfigError("norm_topk_prob=true is not supported for deepseek_v2 (transformers ignores it)")
    grouped = method == "group_limited_greedy"  # greedy ignores n_group / topk_group
    return dict(**_deepseek_moe(d, common), norm_topk_prob=False, scoring_func="softmax", group_score="max",
                n_group=(d.get("n_group") or 1) if grouped else 1,
                topk_group=(d.get("topk_group") or 1) if grouped else 1,
                routed_scaling_factor=number(d, "routed_scaling_factor", 1.0, positive=True))


def _deepseek_v3(d: dict, common: dict) -> dict:
    method, scoring = d.get("topk_method") or "noaux_tc", d.get("scoring_func") or "sigmoid"
    if method != "noaux_tc" or scoring != "sigmoid":
        raise ConfigError(f"deepseek_v3 with topk_method={method!r}, scoring_func={scoring!r} is not supported "
                          f"(noaux_tc, sigmoid)")
    return dict(**_deepseek_moe(d, common), norm_topk_prob=flag(d, "norm_topk_prob", True),
                scoring_func="sigmoid", router_correction_bias=True, group_score="top2_sum",
                n_group=d.get("n_group", 8) or 1, topk_group=d.get("topk_group", 4) or 1,
                routed_scaling_factor=number(d, "routed_scaling_factor", 2.5, positive=True))


_DEEPSEEK_RENAMES = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)

def _glm4_moe(d: dict, common: dict) -> dict:
    """GLM-4.5 / 4.6 / 4.5-Air: GQA with partial rotary (the first half of each head by default), optional per-head
    q/k norm and q/k/v biases; sigmoid routing with a correction bias over n_group groups, renormalised, scaled; one
    ungated shared expert; the first first_k_dense_replace layers dense. Defaults: transformers' Glm4MoeConfig."""
    if d.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"scoring_func={d['scoring_func']!r} is not supported for glm4_moe (only sigmoid)")
    rope_spec = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    moe_intermediate = require(d, "moe_intermediate_size")
    first_dense = d.get("first_k_dense_replace", 1)
    if not isinstance(first_dense, int) or first_dense < 0:
        raise ConfigError(f"first_k_dense_replace must be a non-negative integer, got {first_dense!r}")
    return dict(
        num_experts=require(d, "n_routed_experts", "num_local_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=moe_intermediate,
        intermediate_size=d.get("intermediate_size") or 0,
        norm_topk_prob=flag(d, "norm_topk_prob", True),
        dense_layers=tuple(range(min(first_dense, common["num_layers"]))),
        qkv_bias=flag(d, "attention_bias", False),  # o_proj never has one
        qk_norm="per_head" if flag(d, "use_qk_norm", False) else "none",
        partial_rotary_factor=number(rope_spec, "partial_rotary_factor", None)
        or number(d, "partial_rotary_factor", 0.5),
        shared_expert_intermediate_size=integer(d, "n_shared_experts", 1, minimum=0) * moe_intermediate,
        shared_expert_gated=False,
        scoring_func="sigmoid",
        router_correction_bias=True,
        n_group=d.get("n_group") or 1,
        topk_group=d.get("topk_group") or 1,
        group_score="top2_sum",
        routed_scaling_factor=number(d, "routed_scaling_factor", 1.0, positive=True),
        mtp_layers=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,
    )


def _gpt_oss(d: dict, common: dict) -> dict:
    num_layers = common["num_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]  # transformers' default
    if not isinstance(layer_types, list):
        raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
    window = d.get("sliding_window")
    # OpenAI's reference clamps the SwiGLU at config.swiglu_limit; transformers and our kernels at 7.0 (what every
    # gpt-oss checkpoint sets), so another value would run as if it were 7
    if number(d, "swiglu_limit", 7.0) != 7.0:
        raise ConfigError(f"swiglu_limit={d['swiglu_limit']} is not supported for gpt_oss (only 7.0)")
    return dict(
        num_experts=require(d, "num_local_experts", "num_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=False,  # the router's softmax over the selected k already sums to 1
        qkv_bias=flag(d, "attention_bias", True),
        o_bias=flag(d, "attention_bias", True),
        sliding_window=window if "sliding_attention" in layer_types else None,
        layer_types=tuple(layer_types),
        attention_sinks=True,
        router="topk_softmax",
        router_bias=True,
        expert_activation="swiglu_oai",
        expert_bias=True,
    )


FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("Qwen3-MoE (Qwen3-30B-A3B): per-head q/k RMSNorm, no biases, top-k renormalised when "
                        "norm_topk_prob is set, optional dense layers", _qwen3_moe, 1e-6, 10000.0),
    "qwen2_moe": Family("Qwen2-MoE (Qwen1.5-MoE-A2.7B): QKV biases and a sigmoid-gated shared expert beside the "
                        "routed ones", _qwen2_moe, 1e-6, 10000.0),
    "mixtral": Family("Mixtral (8x7B): plain GQA, optional sliding window, top-2 always renormalised", _mixtral,
                      1e-5, 1000000.0, checkpoint_renames=(
                          (r"\.block_sparse_moe\.", ".mlp."),  # original checkpoints: w1 gate, w3 up, w2 down
                          (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
                          (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
                          (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."))),
    "olmoe": Family("OLMoE (OLMoE-1B-7B): q/k RMSNorm over the whole projection, optional clip_qkv, top-8 not "
                    "renormalised", _olmoe, 1e-5, 10000.0),
    "deepseek_v2": Family("DeepSeek-V2 / V2-Lite: multi-head latent attention (latent KV cache, q_lora_rank "
                          "optional), softmax routing, greedy or group-limited, shared experts, first_k_dense_replace "
                          "dense layers", _deepseek_v2, 1e-6, 10000.0, checkpoint_renames=_DEEPSEEK_RENAMES),
    "deepseek_v3": Family("DeepSeek-V3 / R1 (and Kimi-K2's layout): MLA, sigmoid routing with a correction bias, "
                          "group-limited top-k over the best-two sum of each group, routed_scaling_factor, shared "
                          "experts; the MTP layer is skipped at load", _deepseek_v3, 1e-6, 10000.0,
                          checkpoint_renames=_DEEPSEEK_RENAMES),
    "glm4_moe": Family("GLM-4.5 / 4.6 / 4.5-Air: partial rotary, optional q/k norm and QKV biases, sigmoid routing "
                       "with a correction bias (group-limited, scaled), an ungated shared expert, leading dense "
                       "layers; the MTP layer is skipped", _glm4_moe, 1e-5, 10000.0,
                       checkpoint_renames=((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)),
    "gpt_oss": Family("gpt-oss (20b, 120b): attention sinks, biases, alternating sliding-window (128) and full "
                      "layers, router softmax over its top-k, experts with biases and a clamped SwiGLU",
                      _gpt_oss, 1e-5, 150000.0, checkpoint_renames=((r"\.mlp\.router\.", ".mlp.gate."),),
                      expert_layout="gpt_oss"),
}


def config_from_hf(d: dict, name: str) -> ModelConfig:
    """Parse a config.json dict (model/loader.py adds generation_config.json's EOS ids)."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    family = FAMILIES.get(d.get("model_type"))
    if family is None:
        raise ConfigError(f"unsupported model_type {d.get('model_type')!r}; supported: {', '.join(FAMILIES)}")
    try:
        common = common_fields(d, name, family.rms_norm_eps, family.rope_theta)
        config = ModelConfig(**{**common, **family.fields(d, common)})  # a family may override a common field
    except (TypeError, KeyError) as err:  # e.g. a string where a number belongs
        raise ConfigError(f"malformed {d['model_type']} config.json: {err!r}") from err
    return config
