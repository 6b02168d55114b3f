"""Our fused MoE op as a transformers experts implementation.

    from model.hf_experts import register_experts_implementation
    register_experts_implementation()                 # once per process
    hf_model.set_experts_implementation("staticmoe")  # or from_pretrained(..., experts_implementation="staticmoe")

transformers 5 holds experts as gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], the
layout `fused_moe` takes, so weights are used in place. Experts of another kind (biases, transposed or interleaved
weights, an activation other than SiLU, a custom gate) are refused with an error rather than computed wrongly.
transformers is imported only here, on demand: the rest of `model/` does not depend on it.
"""

import torch

from model.kernels import fused_moe

EXPERTS_IMPLEMENTATION = "staticmoe"
_SILU_CLASSES = ("SiLU", "SiLUActivation")


def _check_supported(experts: torch.nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate

    problems = []
    if not getattr(experts, "has_gate", True):
        problems.append("no gate projection")
    if getattr(experts, "has_bias", False):
        problems.append("biases")
    if getattr(experts, "is_transposed", False):
        problems.append("transposed weights")
    if not getattr(experts, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    if type(getattr(experts, "act_fn", None)).__name__ not in _SILU_CLASSES:
        problems.append(f"activation {type(getattr(experts, 'act_fn', None)).__name__}")
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        problems.append("a custom _apply_gate")
    if problems:
        raise NotImplementedError(f"{type(experts).__name__} cannot use the {EXPERTS_IMPLEMENTATION!r} experts "
                                  f"implementation (SwiGLU experts only): it has {', '.join(problems)}")


def staticmoe_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    if not getattr(self, "_staticmoe_checked", False):
        _check_supported(self)
        self._staticmoe_checked = True
    weight_dtype = self.gate_up_proj.dtype
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(weight_dtype).contiguous()  # [T, H]
    out = fused_moe(
        x,
        self.gate_up_proj,
        self.down_proj,
        top_k_weights.reshape(x.shape[0], -1).float().contiguous(),
        top_k_index.reshape(x.shape[0], -1).to(torch.int32).contiguous(),
    )  # [T, H]
    return out.to(hidden_states.dtype).reshape(hidden_states.shape)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Add our op to transformers' ExpertsInterface under `name`; returns the name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, staticmoe_experts_forward)
    return name
