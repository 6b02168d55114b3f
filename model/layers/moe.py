"""`SparseMoeBlock`: router → softmax top-k (or gpt-oss's top-k → softmax) → the experts op, plus an optional
sigmoid-gated shared expert. gpt-oss's experts add biases (gate_up_proj_bias [E, 2I], gate then up like the weight
rows; down_proj_bias [E, H]) and use the clamped SwiGLU, both computed inside `fused_moe`.

The experts op (`Experts`) is a module of its own so that transforms can wrap it from outside the model: the
engine's metrics time it by forward hooks (model/engine/moe_timer.py). Expert weights use the layout HF transformers 5 holds in memory: gate_up_proj
[E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], which is what `model.kernels.fused_moe` takes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import fused_moe, softmax_topk, topk_softmax
from model.layers.linear import Linear
from model.layers.mlp import GatedMLP


class Experts(nn.Module):
    """forward(x [N, H], topk_weights [N, k] f32, topk_ids [N, k] i32) -> [N, H]: the fused MoE op. It adds the
    tokens routed to each expert to `expert_load` on the device as it runs (free in the kernel; no host sync); the
    engine's metrics read those counts."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
                 bias: bool = False):
        super().__init__()
        self.activation = activation
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, expert_load=self.expert_load,
                         activation=self.activation, w13_bias=self.gate_up_proj_bias, w2_bias=self.down_proj_bias)


class SparseMoeBlock(nn.Module):
    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert_intermediate_size: int = 0,
        router: str = "softmax_topk",
        router_bias: bool = False,
        activation: str = "silu",
        expert_bias: bool = False,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.intermediate_size = intermediate_size
        self.renormalize = renormalize
        self.router = router
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)  # the router
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation, expert_bias)
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(hidden_size, 1)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H]
        router_logits = self.gate(x)  # [N, E]
        if self.router == "topk_softmax":
            topk_weights, topk_ids = topk_softmax(router_logits, self.top_k)  # [N, k] f32, i32
        else:
            topk_weights, topk_ids = softmax_topk(router_logits, self.top_k, self.renormalize)
        out = self.experts(x, topk_weights, topk_ids)  # [N, H]
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}, "
                f"H={self.hidden_size}, I={self.intermediate_size}")
