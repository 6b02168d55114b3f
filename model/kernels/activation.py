"""The expert activations `fused_moe` computes between its two GEMMs, named by an enum at the op boundary.

- `SILU` (default; Mixtral, Qwen-MoE, OLMoE): h = SiLU(gate) · up.
- `SWIGLU_OAI` (gpt-oss): gate = min(gate, limit), up = clamp(up, -limit, limit),
  h = (up + 1) · gate · sigmoid(alpha · gate), alpha = 1.702, limit = 7.0 (the constants of OpenAI's gpt-oss
  reference implementation and of transformers' GptOssExperts).

`gate` and `up` here are GEMM1's outputs after the optional w13 bias. The CUDA epilogue computes the same formula
in float32 (`csrc/moe/sm90_gemm.cuh`, code `ACTIVATION_CODES`).
"""

import enum

import torch
import torch.nn.functional as F

SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


class Activation(str, enum.Enum):
    SILU = "silu"
    SWIGLU_OAI = "swiglu_oai"


ACTIVATION_CODES = {Activation.SILU: 0, Activation.SWIGLU_OAI: 1}  # the csrc enum (moe.h `Activation`)


def parse_activation(value) -> Activation:
    """`Activation` or its string value -> Activation; anything else raises ValueError naming the choices."""
    try:
        return Activation(value)
    except ValueError:
        choices = ", ".join(a.value for a in Activation)
        raise ValueError(f"activation must be one of {choices}, got {value!r}") from None


def apply_activation(gate: torch.Tensor, up: torch.Tensor, activation: Activation) -> torch.Tensor:
    """h = act(gate, up) elementwise in the inputs' dtype (callers pass float32 or float64)."""
    if activation == Activation.SILU:
        return F.silu(gate) * up
    gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
    up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
    return (up + 1) * gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate)
