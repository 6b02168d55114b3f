"""Dense SwiGLU MLP with gate and up projections fused into one GEMM (dense layers and Qwen2-MoE's shared expert)."""

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size)  # gate rows, then up rows
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [N, I] each
        return self.down_proj(F.silu(gate) * up)
