"""The supported MoE families, one row each by HF `model_type`: how its config.json reads into a `ModelConfig` (its
MoE and attention options) and how its checkpoint keys rename to the common layout. The decoder
(model/decoder.py) is generic: families differ only in ModelConfig fields and checkpoint key names, so adding a
family is adding a row here (and, to run it without a download, a preset in model/presets.py).
"""

from dataclasses import dataclass
from typing import Callable

from model.config import ConfigError, ModelConfig, common_fields, require, token_ids


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
    step = d.get("decoder_sparse_step") or 1
    only = set(d.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)


def _qwen_moe(d: dict, common: dict) -> dict:
    """The MoE fields qwen2_moe and qwen3_moe configs spell the same way."""
    if d.get("use_sliding_window"):
        raise ConfigError(f"use_sliding_window=true is not supported for {d['model_type']}")
    return dict(
        num_experts=require(d, "num_experts", "num_local_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "moe_intermediate_size"),
        intermediate_size=d.get("intermediate_size") or 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        dense_layers=_dense_layers(d, common["num_layers"]),
    )


def _qwen3_moe(d: dict, common: dict) -> dict:
    bias = bool(d.get("attention_bias", False))
    return dict(**_qwen_moe(d, common), qkv_bias=bias, o_bias=bias, qk_norm="per_head")


def _qwen2_moe(d: dict, common: dict) -> dict:
    return dict(**_qwen_moe(d, common), qkv_bias=bool(d.get("qkv_bias", True)),
                shared_expert_intermediate_size=d.get("shared_expert_intermediate_size") or 0)


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
    bias = bool(d.get("attention_bias", False))
    return dict(
        num_experts=require(d, "num_experts", "num_local_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=d.get("clip_qkv"),
    )


def _gpt_oss(d: dict, common: dict) -> dict:
    num_layers = common["num_layers"]
    layer_types = d.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]  # transformers' default
    if not isinstance(layer_types, list):
        raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
    window = d.get("sliding_window")
    return dict(
        num_experts=require(d, "num_local_experts", "num_experts"),
        top_k=require(d, "num_experts_per_tok"),
        moe_intermediate_size=require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=False,  # the router's softmax over the selected k already sums to 1
        qkv_bias=bool(d.get("attention_bias", True)),
        o_bias=bool(d.get("attention_bias", True)),
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
    "gpt_oss": Family("gpt-oss (20b, 120b): attention sinks, biases, alternating sliding-window (128) and full "
                      "layers, router softmax over its top-k, experts with biases and a clamped SwiGLU",
                      _gpt_oss, 1e-5, 150000.0, checkpoint_renames=((r"\.mlp\.router\.", ".mlp.gate."),),
                      expert_layout="gpt_oss"),
}


def config_from_hf(d: dict, name: str, extra_eos_token_ids=()) -> ModelConfig:
    """Parse a config.json dict. `extra_eos_token_ids` (e.g. from generation_config.json) are added to EOS."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    family = FAMILIES.get(d.get("model_type"))
    if family is None:
        raise ConfigError(f"unsupported model_type {d.get('model_type')!r}; supported: {', '.join(FAMILIES)}")
    try:
        common = common_fields(d, name, family.rms_norm_eps, family.rope_theta)
        config = ModelConfig(**common, **family.fields(d, common))
    except (TypeError, KeyError) as err:  # e.g. a string where a number belongs
        raise ConfigError(f"malformed {d['model_type']} config.json: {err!r}") from err
    eos = tuple(dict.fromkeys(config.eos_token_ids + token_ids(list(extra_eos_token_ids))))
    return config.replace(eos_token_ids=eos)
