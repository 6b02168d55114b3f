"""FP8 twins of `Linear` and `Experts`: weights in float8_e4m3fn with float32 128x128 block scales, named as block-FP8
checkpoints name them (`weight` + `weight_scale_inv`; the experts' `gate_up_proj` + `gate_up_proj_scale_inv`). They
are swapped in for the plain modules by `model.quantization`, never built by the decoder itself.
"""

import torch
from torch import nn

from model.kernels import fused_moe
from model.kernels.fp8 import FP8_BLOCK, FP8_DTYPE
from model.kernels.fp8_linear import fp8_linear


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale_inv = nn.Parameter(
            torch.empty(_blocks(out_features), _blocks(in_features), dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, check=False)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bias={self.bias is not None}, fp8 e4m3 128x128 blocks"


class Fp8Experts(nn.Module):
    """The experts op of `model.layers.moe.Experts` with FP8 weights: `fused_moe` with w13_scale / w2_scale, which is
    our FP8 kernel on a Hopper GPU and its pure-torch reference elsewhere."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 bias: bool = False, bias_dtype: torch.dtype | None = None):
        super().__init__()
        E, H, inter = num_experts, hidden_size, intermediate_size
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=FP8_DTYPE), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(
            torch.empty(E, _blocks(2 * inter), _blocks(H), dtype=torch.float32), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, inter, dtype=FP8_DTYPE), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(
            torch.empty(E, _blocks(H), _blocks(inter), dtype=torch.float32), requires_grad=False)
        if bias:  # high precision, as the activations
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * inter, dtype=bias_dtype), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.empty(E, H, dtype=bias_dtype), requires_grad=False)
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, expert_load=self.expert_load,
                         w13_scale=self.gate_up_proj_scale_inv, w2_scale=self.down_proj_scale_inv,
                         activation=self.activation, w13_bias=self.gate_up_proj_bias, w2_bias=self.down_proj_bias)
