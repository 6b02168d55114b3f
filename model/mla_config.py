"""`MlaConfig`: the shape of DeepSeek's multi-head latent attention (MLA, arXiv 2405.04434), read from the
`deepseek_v2` / `deepseek_v3` config.json fields of the same names.

Keys and values of all heads are made from one compressed latent per token (`kv_lora_rank` values after
kv_a_layernorm) by kv_b_proj, plus one rope key (`qk_rope_head_dim`) that every head shares; those two are what
the paged KV cache holds (model/layers/mla_attention.py).
"""

from dataclasses import dataclass

from model.config import ConfigError, flag


@dataclass(frozen=True)
class MlaConfig:
    q_lora_rank: int | None  # None: one q_proj (DeepSeek-V2-Lite); else q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int  # the latent every head's keys and values are decompressed from
    qk_nope_head_dim: int  # per-head query/key width without rotary
    qk_rope_head_dim: int  # per-head query width with rotary; the rope key is shared by all heads
    v_head_dim: int
    rope_pairs: bool  # rotate adjacent pairs (x0, x1), (x2, x3)... (V2 always, V3's rope_interleave); else halves
    attention_bias: bool = False  # on q_a_proj, kv_a_proj_with_mqa and o_proj, as transformers builds them

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        rank = self.q_lora_rank
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
            raise ConfigError(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values the KV cache holds per token per layer: the latent and the rope key (576 for V2 and V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def uncompressed_cache_width(self, num_heads: int) -> int:
        """What a cache of decompressed keys and values would hold per token per layer: K [H, nope + rope] and
        V [H, v] (128 × (192 + 128) = 40960 for V3)."""
        return num_heads * (self.qk_head_dim + self.v_head_dim)


def _size(d: dict, key: str, default=None):
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"config.json has no {key!r}")
    return value


def mla_from_hf(d: dict) -> MlaConfig:
    """The MLA fields of a deepseek_v2 / deepseek_v3 config.json. transformers' defaults fill the ones a config
    leaves out (q_lora_rank 1536: a config must write null to have none)."""
    model_type = d.get("model_type")
    return MlaConfig(
        q_lora_rank=d.get("q_lora_rank", 1536),
        kv_lora_rank=_size(d, "kv_lora_rank", 512),
        qk_nope_head_dim=_size(d, "qk_nope_head_dim", 128),
        qk_rope_head_dim=_size(d, "qk_rope_head_dim", 64),
        v_head_dim=_size(d, "v_head_dim", 128),
        # deepseek_v2 rotates complex pairs in transformers; deepseek_v3 has the rope_interleave switch
        rope_pairs=True if model_type == "deepseek_v2" else flag(d, "rope_interleave", True),
        attention_bias=flag(d, "attention_bias", False),
    )
