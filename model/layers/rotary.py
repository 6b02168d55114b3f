"""Rotary position embeddings (the "rotate half" layout of HF Llama-style models), cos/sin cached per position.
Frequencies: plain, "linear" scaling (positions divided by a factor) or "yarn" (arXiv 2309.00071: interpolate the
slow-rotating dimensions by the factor, keep the fast ones, a linear ramp between, and scale cos/sin)."""

import math

import torch
from torch import nn

from model.config import ModelConfig, YarnScaling
from model.layers.fusion import gpu_fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2. [d/2] float32"""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def yarn_inv_freq(rotary_dim: int, theta: float, yarn: YarnScaling) -> torch.Tensor:
    """YaRN's frequencies [d/2] float32. Dimension i rotates pretraining_len·inv_freq_i/2π times over the original
    context; those turning more than beta_fast times keep their frequency (extrapolate), those turning fewer than
    beta_slow times are divided by the factor (interpolate), and a linear ramp over dimension index blends between."""

    def dim_turning(turns: float) -> float:  # the (fractional) dimension index that turns `turns` times
        return rotary_dim * math.log(yarn.original_max_position_embeddings / (turns * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = dim_turning(yarn.beta_fast), dim_turning(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if high == low:
        high += 0.001  # a step instead of a ramp, without dividing by 0
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 keep .. 1 scale
    kept = default_inv_freq(rotary_dim, theta)  # [d/2]
    return kept / yarn.factor * ramp + kept * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, rotary_dim]; `rotary_dim` < head_dim rotates only the first rotary_dim
    channels of each head (partial rotary)."""

    def __init__(self, rotary_dim: int, max_positions: int, theta: float, linear_factor: float = 1.0,
                 yarn: YarnScaling | None = None):
        super().__init__()
        if yarn is not None and linear_factor != 1.0:
            raise ValueError("linear and yarn rope scaling are exclusive")
        if yarn is None:
            inv_freq, scale = default_inv_freq(rotary_dim, theta) / linear_factor, 1.0  # [D/2]
        else:
            inv_freq, scale = yarn_inv_freq(rotary_dim, theta, yarn), yarn.cos_sin_scale()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos_cache", angles.cos() * scale, persistent=False)
        self.register_buffer("sin_cache", angles.sin() * scale, persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "RotaryEmbedding":
        return cls(config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_linear_factor,
                   config.rope_yarn)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, D] for `positions` [N], in the activation dtype (as HF casts them before rotating, which
        keeps bf16 results alike). Computed once per step and shared by all layers."""
        return self.cos_cache[positions].unsqueeze(1).to(dtype), self.sin_cache[positions].unsqueeze(1).to(dtype)


@gpu_fused
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, Hkv, D], cos/sin [N, 1, D]."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
