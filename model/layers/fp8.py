"""FP8 twins of `Linear` and `Experts`: weights in float8_e4m3fn with float32 128x128 block scales, named as block-FP8
checkpoints name them (`weight` + `weight_scale_inv`; the experts' `gate_up_proj` + `gate_up_proj_scale_inv`). They
are swapped in for the plain modules by `model.quantization`, never built by the decoder itself.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import fused_moe
from model.kernels.fp8 import FP8_BLOCK, FP8_DTYPE
from model.kernels.fp8_linear import fp8_linear
from model.layers.padding_rows import masking_padding


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


def padded(n: int) -> int:
    return _blocks(n) * FP8_BLOCK


class Fp8Experts(nn.Module):
    """The experts op of `model.layers.moe.Experts` with FP8 weights: `fused_moe` with w13_scale / w2_scale, which is
    our FP8 kernel on a Hopper GPU and its pure-torch reference elsewhere.

    FP8 needs H and I in whole 128-blocks. Other sizes (gpt-oss: 2880) are padded with zeros at quantisation
    (`pad=True`): w13 [E, 2Ip, Hp] holds the gate rows at [0, I) and the up rows at [Ip, Ip + I), w2 [E, Hp, Ip];
    x is padded to Hp per call and the output cut back to H. Zero gate and up rows give h = act(0, 0) = 0 for both
    activations, and zero columns add nothing, so the padding changes no value (an x group's amax is that of its
    real columns). The biases keep their logical shapes (loaded as stored) and are padded once, at first use."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 bias: bool = False, bias_dtype: torch.dtype | None = None, pad: bool = False):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.is_padded = bool(pad and (hidden_size % FP8_BLOCK or intermediate_size % FP8_BLOCK))
        E = num_experts
        H, inter = (padded(hidden_size), padded(intermediate_size)) if self.is_padded else (hidden_size,
                                                                                           intermediate_size)
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H, dtype=FP8_DTYPE), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(
            torch.empty(E, _blocks(2 * inter), _blocks(H), dtype=torch.float32), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, inter, dtype=FP8_DTYPE), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(
            torch.empty(E, _blocks(H), _blocks(inter), dtype=torch.float32), requires_grad=False)
        if bias:  # high precision, as the activations; logical shapes
            self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * intermediate_size, dtype=bias_dtype),
                                                  requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.empty(E, hidden_size, dtype=bias_dtype), requires_grad=False)
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.int64), persistent=False)
        self._padded_biases = None  # (bias versions, w13 bias, w2 bias), made at first use

    def logical_shape(self, name: str) -> tuple[int, ...] | None:
        """The high-precision shape the checkpoint (and `pad_expert`) gives for weight `name`, where padded."""
        if not self.is_padded:
            return None
        E, H, inter = self.num_experts, self.hidden_size, self.intermediate_size
        return {"gate_up_proj": (E, 2 * inter, H), "down_proj": (E, H, inter)}.get(name)

    def pad_expert(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """One expert's high-precision weight [2I, H] or [H, I] -> its zero-padded [2Ip, Hp] or [Hp, Ip]."""
        H, inter = self.hidden_size, self.intermediate_size
        Hp, Ip = padded(H), padded(inter)
        if name == "gate_up_proj":
            out = value.new_zeros(2 * Ip, Hp)
            out[:inter, :H], out[Ip: Ip + inter, :H] = value[:inter], value[inter:]
            return out
        out = value.new_zeros(Hp, Ip)
        out[:H, :inter] = value
        return out

    def _biases(self):
        if not self.is_padded or self.gate_up_proj_bias is None:
            return self.gate_up_proj_bias, self.down_proj_bias
        versions = (self.gate_up_proj_bias._version, self.down_proj_bias._version)
        if self._padded_biases is None or self._padded_biases[0] != versions:
            inter, Ip, Hp = self.intermediate_size, padded(self.intermediate_size), padded(self.hidden_size)
            gate, up = self.gate_up_proj_bias.split(inter, dim=1)
            b13 = torch.cat((F.pad(gate, (0, Ip - inter)), F.pad(up, (0, Ip - inter))), dim=1)  # [E, 2Ip]
            b2 = F.pad(self.down_proj_bias, (0, Hp - self.hidden_size))  # [E, Hp]
            self._padded_biases = (versions, b13.contiguous(), b2.contiguous())
        return self._padded_biases[1:]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        w13_bias, w2_bias = self._biases()
        H = self.hidden_size
        xp = F.pad(x, (0, padded(H) - H)) if self.is_padded else x  # [N, Hp]
        out = fused_moe(xp, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, expert_load=self.expert_load,
                        skip_out_of_range_ids=masking_padding(),  # -1: a CUDA graph's padding rows
                        w13_scale=self.gate_up_proj_scale_inv, w2_scale=self.down_proj_scale_inv,
                        activation=self.activation, w13_bias=w13_bias, w2_bias=w2_bias)
        return out[:, :H] if self.is_padded else out
