"""`ModelConfig`: the one description of a MoE model's shape, read from a Hugging Face `config.json` dict.

Every family is parsed here, so the mapping of HF field names (which differ between families and between
transformers versions) lives in one place. Anything we cannot run raises `ConfigError` naming the field.
"""

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


class ConfigError(ValueError):
    """A config.json we cannot run; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # per routed expert
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step), 0 when none exist
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float = 1.0  # positions are divided by this ("linear" rope scaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3: RMSNorm over head_dim) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert; else sigmoid-gated (Qwen2-MoE)
    sliding_window: int | None = None
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of the MoE block
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    initializer_range: float = 0.02
    checkpoint_dtype: str | None = None  # "bfloat16", ... as the checkpoint declares it
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "max_position_embeddings", "num_experts", "top_k", "moe_intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the number of experts {self.num_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ConfigError(f"qk_norm must be none/per_head/full, got {self.qk_norm!r}")
        if self.dense_layers and self.intermediate_size <= 0:
            raise ConfigError("dense MLP layers need intermediate_size > 0")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 8:  # the fused MoE op reads rows in 16-byte vectors
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of 8")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _require(d: dict, key: str, *aliases: str):
    for k in (key, *aliases):
        if d.get(k) is not None:
            return d[k]
    raise ConfigError(f"config.json has no {key!r}")


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise ConfigError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    return tuple(values)


# transformers' defaults for fields a config.json may leave out: (rms_norm_eps, rope_theta)
_FAMILY_DEFAULTS = {"qwen3_moe": (1e-6, 10000.0), "qwen2_moe": (1e-6, 10000.0), "mixtral": (1e-5, 1000000.0),
                    "olmoe": (1e-5, 10000.0)}


def _rope(d: dict) -> tuple[float, float]:
    """(theta, linear factor) from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", _FAMILY_DEFAULTS[d["model_type"]][1]))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), float(params.get("factor", scaling.get("factor", 1.0)))
    raise ConfigError(f"rope type {rope_type!r} is not supported (supported: default, linear)")


def _dense_layers(d: dict, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE layers that keep a dense MLP: listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = d.get("decoder_sparse_step") or 1
    only = set(d.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)


def _common(d: dict, name: str) -> dict:
    hidden = _require(d, "hidden_size")
    heads = _require(d, "num_attention_heads")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported (only silu)")
    theta, linear_factor = _rope(d)
    return dict(
        model_type=d["model_type"],
        name=name,
        vocab_size=_require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=_require(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        max_position_embeddings=_require(d, "max_position_embeddings"),
        rms_norm_eps=float(d.get("rms_norm_eps", _FAMILY_DEFAULTS[d["model_type"]][0])),
        rope_theta=theta,
        rope_linear_factor=linear_factor,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        eos_token_ids=_token_ids(d.get("eos_token_id")),
        bos_token_id=d.get("bos_token_id"),
        initializer_range=float(d.get("initializer_range", 0.02)),
        checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
    )


def _no_sliding_window(d: dict) -> None:
    if d.get("use_sliding_window"):
        raise ConfigError(f"use_sliding_window=true is not supported for {d['model_type']}")


def _qwen_moe_fields(d: dict, name: str) -> dict:
    """Fields qwen2_moe and qwen3_moe configs spell the same way."""
    _no_sliding_window(d)
    c = _common(d, name)
    return dict(
        **c,
        num_experts=_require(d, "num_experts", "num_local_experts"),
        top_k=_require(d, "num_experts_per_tok"),
        moe_intermediate_size=_require(d, "moe_intermediate_size"),
        intermediate_size=d.get("intermediate_size") or 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        dense_layers=_dense_layers(d, c["num_layers"]),
    )


def _qwen3_moe(d: dict, name: str) -> ModelConfig:
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(**_qwen_moe_fields(d, name), qkv_bias=bias, o_bias=bias, qk_norm="per_head")


def _qwen2_moe(d: dict, name: str) -> ModelConfig:
    return ModelConfig(**_qwen_moe_fields(d, name), qkv_bias=bool(d.get("qkv_bias", True)),
                       shared_expert_intermediate_size=d.get("shared_expert_intermediate_size") or 0)


def _mixtral(d: dict, name: str) -> ModelConfig:
    c = _common(d, name)
    inter = _require(d, "intermediate_size")
    return ModelConfig(
        **c,
        num_experts=_require(d, "num_local_experts", "num_experts"),
        top_k=_require(d, "num_experts_per_tok"),
        moe_intermediate_size=inter,
        intermediate_size=0,
        norm_topk_prob=True,  # Mixtral always renormalises its top-k
        sliding_window=d.get("sliding_window"),
    )


def _olmoe(d: dict, name: str) -> ModelConfig:
    c = _common(d, name)
    bias = bool(d.get("attention_bias", False))
    if c["head_dim"] * c["num_heads"] != c["hidden_size"]:
        raise ConfigError("OLMoE's full-width q/k norm needs head_dim * num_attention_heads == hidden_size")
    return ModelConfig(
        **c,
        num_experts=_require(d, "num_experts", "num_local_experts"),
        top_k=_require(d, "num_experts_per_tok"),
        moe_intermediate_size=_require(d, "intermediate_size"),
        intermediate_size=0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",
        clip_qkv=d.get("clip_qkv"),
    )


_PARSERS = {"qwen3_moe": _qwen3_moe, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "olmoe": _olmoe}


def config_from_hf(d: dict, name: str, extra_eos_token_ids=()) -> ModelConfig:
    """Parse a config.json dict. `extra_eos_token_ids` (e.g. from generation_config.json) are added to EOS."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in _PARSERS:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        config = _PARSERS[model_type](d, name)
    except (TypeError, KeyError) as err:  # e.g. a string where a number belongs
        raise ConfigError(f"malformed {model_type} config.json: {err!r}") from err
    eos = tuple(dict.fromkeys(config.eos_token_ids + _token_ids(list(extra_eos_token_ids))))
    return config.replace(eos_token_ids=eos)
