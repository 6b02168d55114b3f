"""Rotary position embeddings (the "rotate half" layout of HF Llama-style models), cos/sin cached per position."""

import torch
from torch import nn

from model.layers.fusion import gpu_fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, linear_factor: float = 1.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = inv_freq / linear_factor  # [D/2]
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos_cache", angles.cos(), persistent=False)
        self.register_buffer("sin_cache", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, D] for `positions` [N], in the activation dtype (as HF casts them before rotating, which
        keeps bf16 results alike). Computed once per step and shared by all layers."""
        return self.cos_cache[positions].unsqueeze(1).to(dtype), self.sin_cache[positions].unsqueeze(1).to(dtype)


@gpu_fused
def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, Hkv, D], cos/sin [N, 1, D]."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
