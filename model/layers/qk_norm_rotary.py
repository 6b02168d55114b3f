"""Q/K RMSNorm and rotary embeddings as one fused function (issue 21, "fewer, fuller kernels per decode layer").

Qwen3 normalises each head of q and k, OLMoE the whole q and k projections; both then rotate. Run apart, that is three
kernels per layer in a decode graph (q-norm, k-norm, rotary: the OLMoE kernel table in benchmarks/NOTES.md). Traced
as one function, `torch.compile` fuses each tensor's norm with its rotation (the rotation's partner channel is read
from the same row whose statistics the kernel has just reduced), so q and k are read and written once each.
The math is the unfused code's, op for op: where nothing is compiled (the CPU) the results are bit-identical.
"""

import torch

from model.layers.fusion import gpu_fused
from model.layers.norm import rms_norm
from model.layers.rotary import apply_rotary


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H, D]: per head when weight is [D], else over the whole row of H·D channels (weight [H·D])."""
    if weight.shape[0] == x.shape[-1]:
        return rms_norm.eager(x, weight, eps)
    return rms_norm.eager(x.flatten(1), weight, eps).view_as(x)


@gpu_fused
def norm_rotary_qk(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D], k [N, Hkv, D] -> RMSNorm'd (per head or whole row, by the weights' size), then rotated by
    cos/sin [N, 1, R]."""
    return apply_rotary.eager(_norm(q, q_weight, eps), _norm(k, k_weight, eps), cos, sin)
