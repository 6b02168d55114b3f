"""`ModelConfig`: the one description of a MoE model's shape, and the readers of the `config.json` fields every
family spells the same way. What differs by family lives in its row of model/families.py. Anything we cannot run
raises `ConfigError` naming the field.
"""

import dataclasses
import math
from dataclasses import dataclass, field


LAYER_TYPES = ("sliding_attention", "full_attention")
# Over any published context (Llama 4 Scout: 10M); RotaryEmbedding allocates its tables for every position up front.
MAX_POSITIONS = 2**24
# ModelConfig fields that config.json spells otherwise in every family, for error messages
JSON_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "top_k": "num_experts_per_tok"}
ROUTERS = ("softmax_topk", "topk_softmax")


class ConfigError(ValueError):
    """A config.json we cannot run; the message names the field."""


@dataclass(frozen=True)
class YarnScaling:
    """HF rope type "yarn" (arXiv 2309.00071), the fields as transformers reads them; model/layers/rotary.py turns
    them into frequencies. DeepSeek sets mscale / mscale_all_dim; Qwen3 and gpt-oss leave attention_factor to be
    derived from factor; gpt-oss sets truncate=false."""

    factor: float  # context extension ratio (positions interpolated by it in the low-frequency dimensions)
    original_max_position_embeddings: int  # the pretraining context; the ramp's bounds are measured against it
    beta_fast: float = 32.0  # dimensions rotating more than beta_fast times over the original context extrapolate
    beta_slow: float = 1.0  # ... less than beta_slow times interpolate; a linear ramp between
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # cos/sin scale; None derives it from factor (and mscale/mscale_all_dim)
    truncate: bool = True  # round the ramp bounds outward to whole dimensions

    @staticmethod
    def magnitude_scale(factor: float, mscale: float = 1.0) -> float:
        """YaRN's attention temperature, 0.1·mscale·ln(factor) + 1 (1 for factor <= 1)."""
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    def cos_sin_scale(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_factor`)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self.magnitude_scale(self.factor, self.mscale) / self.magnitude_scale(self.factor,
                                                                                         self.mscale_all_dim)
        return self.magnitude_scale(self.factor)

    def softmax_scale_multiplier(self) -> float:
        """DeepSeek (V2/V3) also multiplies the attention softmax scale by magnitude_scale(factor, mscale_all_dim)²
        (transformers' `yarn_apply_mscale`); 1 without mscale_all_dim. Other families do not."""
        return self.magnitude_scale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


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
    rope_yarn: YarnScaling | None = None  # "yarn" rope scaling
    partial_rotary_factor: float = 1.0  # the first head_dim * factor channels of q/k rotate, the rest pass (GLM-4.5)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3: RMSNorm over head_dim) | "full" (OLMoE: over all heads)
    clip_qkv: float | None = None
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert; else a dense MLP this wide beside the experts
    shared_expert_gated: bool = True  # Qwen2-MoE gates it by a per-token sigmoid; DeepSeek and GLM add it ungated
    # routing beyond softmax top-k (model/kernels/routing.py grouped_topk): DeepSeek-V2/V3, GLM-4.5
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    router_correction_bias: bool = False  # e_score_correction_bias [E]: added to the scores for the choice only
    n_group: int = 1  # experts form n_group groups of consecutive ids; each token keeps its topk_group best groups
    topk_group: int = 1
    group_score: str = "max"  # a group's score: its best expert ("max", V2) or best two summed ("top2_sum", V3)
    routed_scaling_factor: float = 1.0  # the routed experts' weights are multiplied by it
    sliding_window: int | None = None
    # Per layer "sliding_attention" (window `sliding_window`) or "full_attention" (gpt-oss alternates them);
    # () = every layer uses `sliding_window` (Mixtral).
    layer_types: tuple[str, ...] = ()
    attention_sinks: bool = False  # a learned logit per query head joins each softmax's denominator (gpt-oss)
    router: str = "softmax_topk"  # | "topk_softmax": top-k of the logits, softmax over those k only (gpt-oss)
    router_bias: bool = False
    expert_activation: str = "silu"  # model.kernels.activation.Activation value
    expert_bias: bool = False  # experts carry gate_up and down biases (gpt-oss)
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of the MoE block
    mtp_layers: int = 0  # multi-token-prediction layers stored after the decoder's (num_nextn_predict_layers); unused
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    initializer_range: float = 0.02
    checkpoint_dtype: str | None = None  # "bfloat16", ... as the checkpoint declares it
    quantization: object = None  # model.quant_config.Fp8CheckpointConfig of a block-FP8 checkpoint, else None
    mla: object = None  # model.mla_config.MlaConfig: latent attention (deepseek_v2/v3; head_dim is the rope width)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "max_position_embeddings", "num_experts", "top_k", "moe_intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{JSON_NAMES.get(name, name)} must be a positive integer, got {value!r}")
        if self.max_position_embeddings > MAX_POSITIONS:  # the rotary tables are sized for every position up front
            raise ConfigError(f"max_position_embeddings={self.max_position_embeddings} exceeds {MAX_POSITIONS}")
        for name in ("intermediate_size", "shared_expert_intermediate_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            if f.type is bool and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")
        for name, value, at_least_zero in (("rms_norm_eps", self.rms_norm_eps, False),
                                           ("rope_theta", self.rope_theta, False),
                                           ("clip_qkv", self.clip_qkv, False),
                                           ("routed_scaling_factor", self.routed_scaling_factor, False),
                                           ("initializer_range", self.initializer_range, True)):
            if value is not None:
                check_number(value, name, positive=not at_least_zero, nonnegative=at_least_zero)
        outside = [i for i in self.eos_token_ids if i >= self.vocab_size]
        if outside:
            raise ConfigError(f"eos_token_id {outside[0]} is outside the vocabulary (vocab_size {self.vocab_size})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} exceeds the number of experts {self.num_experts}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} must give an even, non-zero number "
                              f"of rotary channels of head_dim={self.head_dim}")
        if not _is_int(self.mtp_layers) or self.mtp_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be a non-negative integer, got {self.mtp_layers!r}")
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ConfigError(f"qk_norm must be none/per_head/full, got {self.qk_norm!r}")
        if self.dense_layers and self.intermediate_size <= 0:
            raise ConfigError("dense MLP layers need intermediate_size > 0")
        self._check_routing()
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ConfigError(f"layer_types holds {sorted(unknown)}; supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.mla is not None and (self.sliding_window is not None or self.attention_sinks):
            raise ConfigError("MLA attention has no sliding window or attention sinks")
        if self.expert_activation not in ("silu", "swiglu_oai"):
            raise ConfigError(f"expert activation {self.expert_activation!r} is not supported (silu, swiglu_oai)")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 8:  # the fused MoE op reads rows in 16-byte vectors
                raise ConfigError(f"{name}={getattr(self, name)} must be a multiple of 8")

    @property
    def rotary_dim(self) -> int:
        """The rotated channels of each q/k head, as transformers computes them: int(head_dim * factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def grouped_routing(self) -> bool:
        """Whether routing needs grouped_topk (anything but plain softmax top-k)."""
        return (self.scoring_func != "softmax" or self.router_correction_bias or self.n_group > 1
                or self.routed_scaling_factor != 1.0)

    def _check_routing(self) -> None:
        from model.kernels.routing import check_grouped_routing  # torch-only module; kept out of this import

        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        for name in ("n_group", "topk_group"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        try:
            check_grouped_routing(self.num_experts, self.top_k, self.scoring_func, self.n_group, self.topk_group,
                                  self.group_score)
        except ValueError as err:
            raise ConfigError(f"routing: {err}") from err
        # grouped_topk scores the bias-free fp32 router product; no family combines it with gpt-oss's router
        if self.grouped_routing and (self.router != "softmax_topk" or self.router_bias):
            raise ConfigError(f"router={self.router!r} (router_bias={self.router_bias}) cannot be combined with "
                              "grouped routing (scoring_func, e_score_correction_bias, n_group, routed_scaling_factor)")

    def sliding_window_of(self, layer_idx: int) -> int | None:
        """The attention window of a layer (None = full causal attention)."""
        if self.layer_types and self.layer_types[layer_idx] == "full_attention":
            return None
        return self.sliding_window

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx not in self.dense_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def require(d: dict, key: str, *aliases: str):
    """The first of `key` and its aliases that config.json sets."""
    for k in (key, *aliases):
        if d.get(k) is not None:
            return d[k]
    raise ConfigError(f"config.json has no {key!r}")


def token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ConfigError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    return tuple(values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no 1


def flag(d: dict, key: str, default: bool, label: str | None = None) -> bool:
    """A config.json boolean: true or false (absent or null: `default`). A string is refused: bool("false") is
    True. Errors name `label` if given, else the key."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{label or key} must be true or false, got {value!r}")
    return value


def check_number(value, key: str, positive: bool = False, nonnegative: bool = False, label: str | None = None) -> float:
    """`value` as a float: a finite JSON number (not a string, not a boolean), > 0 or >= 0 when asked; errors name
    `label` (default: the key)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or (positive and value <= 0) or (nonnegative and value < 0):
        kind = "a positive" if positive else "a non-negative" if nonnegative else "a finite"
        raise ConfigError(f"{label or key} must be {kind} number, got {value!r}")
    return float(value)


def number(d: dict, key: str, default=None, positive: bool = False, nonnegative: bool = False,
           label: str | None = None):
    """A numeric config.json field as a float (absent or null: `default`), or a ConfigError naming it (or `label`)."""
    value = d.get(key)
    return default if value is None else check_number(value, key, positive, nonnegative, label)


def check_integer(value, key: str, minimum: int | None = None, label: str | None = None) -> int:
    """`value` as a JSON integer (not a float, not a boolean), at least `minimum`; errors name `label` or the key."""
    if not _is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else " >= 0" if minimum == 0 else f" >= {minimum}"
        raise ConfigError(f"{label or key} must be an integer{bound}, got {value!r}")
    return value


def integer(d: dict, key: str, default=None, minimum: int | None = None):
    """An integer config.json field (absent or null: `default`), at least `minimum`, or a ConfigError naming it."""
    value = d.get(key)
    return default if value is None else check_integer(value, key, minimum)


def _rope_number(spec: dict, key: str, default=None, positive: bool = True):
    """A numeric field of the rope scaling dict, named as one in errors."""
    return number(spec, key, default, positive=positive, label=f"rope scaling field {key!r}")


def _yarn(spec: dict, d: dict) -> YarnScaling:
    """transformers' reading: a top-level original_max_position_embeddings wins over the rope dict's (Phi-3 style),
    max_position_embeddings when neither sets it; factor defaults to their ratio; beta_fast/beta_slow 0 or null mean
    the defaults 32/1."""
    original = check_integer(d.get("original_max_position_embeddings") or spec.get("original_max_position_embeddings")
                             or d.get("max_position_embeddings"), "original_max_position_embeddings", minimum=1,
                             label="rope scaling field 'original_max_position_embeddings'")
    factor = _rope_number(spec, "factor")
    if factor is None:
        factor = require(d, "max_position_embeddings") / original
    truncate = flag(spec, "truncate", True, label="rope scaling field 'truncate'")
    yarn = YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(_rope_number(spec, "beta_fast", positive=False) or 32),
        beta_slow=float(_rope_number(spec, "beta_slow", positive=False) or 1),
        mscale=_rope_number(spec, "mscale", positive=False),
        mscale_all_dim=_rope_number(spec, "mscale_all_dim", positive=False),
        attention_factor=_rope_number(spec, "attention_factor"),
        truncate=truncate,
    )
    if yarn.beta_fast < yarn.beta_slow:
        raise ConfigError(f"rope scaling beta_fast={yarn.beta_fast} must be >= beta_slow={yarn.beta_slow}")
    return yarn


def rope(d: dict, default_theta: float) -> dict:
    """The rope fields of ModelConfig from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (older; `type` for `rope_type` in the oldest)."""
    spec = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    theta = spec.get("rope_theta")
    theta = number(d, "rope_theta", default_theta, positive=True) if theta is None else \
        check_number(theta, "rope_theta", positive=True)
    rope_type = spec.get("rope_type") or spec.get("type") or "default"
    if rope_type == "default":
        return dict(rope_theta=theta)
    if rope_type == "linear":
        return dict(rope_theta=theta, rope_linear_factor=float(_rope_number(spec, "factor", 1.0)))
    if rope_type == "yarn":
        return dict(rope_theta=theta, rope_yarn=_yarn(spec, d))
    raise ConfigError(f"rope type {rope_type!r} is not supported (supported: default, linear, yarn)")


def parse_quantization_config(value):
    from model.quant_config import parse_quantization_config as parse  # it imports ConfigError from here

    return parse(value)


def common_fields(d: dict, name: str, default_rms_norm_eps: float, default_rope_theta: float) -> dict:
    """The ModelConfig fields of the decoder every family shares (attention shape, norms, rotary, vocabulary);
    the defaults are transformers' for fields a config.json may leave out."""
    hidden = require(d, "hidden_size")
    heads = require(d, "num_attention_heads")
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads)):  # divided before __post_init__
        if not _is_int(value) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported (only silu)")
    rope_fields = rope(d, default_rope_theta)
    max_positions = require(d, "max_position_embeddings")
    # YaRN's context is original x factor, as vLLM takes it (Qwen3's model cards add factor 4 over 32768 and leave
    # max_position_embeddings at 40960)
    if (yarn := rope_fields.get("rope_yarn")) is not None:
        max_positions = max(max_positions, int(yarn.original_max_position_embeddings * yarn.factor))
    return dict(
        model_type=d["model_type"],
        name=name,
        vocab_size=require(d, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(d, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=integer(d, "num_key_value_heads", heads, minimum=1),
        head_dim=d.get("head_dim") or hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=number(d, "rms_norm_eps", default_rms_norm_eps, positive=True),
        **rope_fields,
        tie_word_embeddings=flag(d, "tie_word_embeddings", False),
        eos_token_ids=token_ids(d.get("eos_token_id")),
        bos_token_id=d.get("bos_token_id"),
        initializer_range=number(d, "initializer_range", 0.02, nonnegative=True),
        checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
        quantization=parse_quantization_config(d.get("quantization_config")),
    )
