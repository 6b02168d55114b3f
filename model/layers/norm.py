"""RMSNorm as the HF MoE families compute it: statistics in fp32, scale applied in the weight's dtype."""

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.fusion import gpu_fused


@gpu_fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., size]
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


@gpu_fused
def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, its RMSNorm): the residual add folded into the norm's kernel."""
    summed = residual + delta
    normed = F.rms_norm(summed.float(), (summed.shape[-1],), eps=eps)
    return summed, weight * normed.to(summed.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., size]
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, norm of it) [N, size] each."""
        return add_rms_norm(residual, delta, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

