"""`SparseMoeBlock`: router → top-k → the experts op, plus an optional shared expert.

Routing (model/kernels/routing.py): softmax top-k (Mixtral, Qwen-MoE, OLMoE), gpt-oss's top-k then softmax over the k
(a router with a bias), or group-limited top-k (DeepSeek-V2: softmax; DeepSeek-V3 and GLM-4.5: sigmoid with a
correction bias for the choice). gpt-oss's experts add biases (gate_up_proj_bias [E, 2I], gate then up like the
weight rows; down_proj_bias [E, H]) and use the clamped SwiGLU, both computed inside `fused_moe`. The shared expert
is a dense SwiGLU MLP every token goes through, added to the routed output: sigmoid-gated per token in Qwen2-MoE,
ungated in DeepSeek and GLM (whose `n_shared_experts` experts are one MLP of n_shared × moe_intermediate_size
columns; the families rename their `shared_experts.` keys to `shared_expert.`).

The experts op (`Experts`) is a module of its own so that transforms can wrap it from outside the model: the
engine's metrics time it by forward hooks (model/engine/moe_timer.py). Expert weights use the layout HF
transformers 5 holds in memory: gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I], which is
what `model.kernels.fused_moe` takes.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kernels import GroupedRouting, fused_linear_route, fused_moe, grouped_topk, softmax_topk, topk_softmax
from model.layers.linear import Linear
from model.layers.mlp import GatedMLP
from model.layers.padding_rows import masking_padding, route_padding_nowhere


class Experts(nn.Module):
    """forward(x [N, H], topk_weights [N, k] f32, topk_ids [N, k] i32) -> [N, H]: the fused MoE op. It adds the
    tokens routed to each expert to `expert_load` on the device as it runs (free in the kernel; no host sync); the
    engine's metrics read those counts. Slots with id -1 route nowhere: a CUDA graph's padding rows
    (model/layers/padding_rows.py)."""

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
                         skip_out_of_range_ids=masking_padding(), activation=self.activation,
                         w13_bias=self.gate_up_proj_bias, w2_bias=self.down_proj_bias)


class Router(Linear):
    """The router's linear (E outputs; a bias in gpt-oss), with DeepSeek-V3's `e_score_correction_bias` [E] float32
    when the routing uses one (the checkpoint's `mlp.gate.e_score_correction_bias`; it stays float32 in a bf16
    model)."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool, bias: bool = False):
        super().__init__(hidden_size, num_experts, bias=bias)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32)) if correction_bias else None
        )


def routing_of(config: ModelConfig) -> GroupedRouting | None:
    """The grouped routing a config asks for; None for plain softmax top-k."""
    if not config.grouped_routing:
        return None
    return GroupedRouting(scoring=config.scoring_func, correction_bias=config.router_correction_bias,
                          num_groups=config.n_group, topk_groups=config.topk_group, group_score=config.group_score,
                          scaling_factor=float(config.routed_scaling_factor))


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
        shared_expert_gated: bool = True,
        routing: GroupedRouting | None = None,  # None: `router` decides
        router: str = "softmax_topk",  # | "topk_softmax" (gpt-oss); ModelConfig refuses it beside grouped routing
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
        self.routing = routing
        self.router = router
        self.gate = Router(hidden_size, num_experts, routing is not None and routing.correction_bias, router_bias)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, activation, expert_bias)
        self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size) \
            if shared_expert_intermediate_size else None
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert_intermediate_size and shared_expert_gated \
            else None
        # > 0: the shared MLP was moved into `experts` as this many extra experts (model/layers/shared_expert_fusion)
        self.fused_shared_slots = 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_weights [N, k] float32, topk_ids [N, k] int32 for x [N, H]."""
        if self.routing is None:
            fused = fused_linear_route(x, self.gate.weight, self.gate.bias, self.top_k,
                                       softmax_all=self.router != "topk_softmax", renormalize=self.renormalize)
            if fused is not None:  # decode batches with STATICMOE_ROUTER_FUSED=1: linear and routing, one launch
                return fused
            if self.router == "topk_softmax":
                return topk_softmax(self.gate(x), self.top_k)
            return softmax_topk(self.gate(x), self.top_k, self.renormalize)
        r = self.routing
        # scored in float32 from the float32 input, as DeepSeek's and transformers' routers do (a bf16 logit could
        # flip a choice between close experts); the upcast weight is E x H, small beside the experts
        logits = F.linear(x.float(), self.gate.weight.float())  # [N, E]
        return grouped_topk(logits, self.top_k, scoring=r.scoring, correction_bias=self.gate.e_score_correction_bias,
                            num_groups=r.num_groups, topk_groups=r.topk_groups, group_score=r.group_score,
                            renormalize=self.renormalize, scaling_factor=r.scaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H]
        topk_weights, topk_ids = self.route(x)  # [N, k] f32, i32
        if self.fused_shared_slots:
            topk_weights, topk_ids = self._with_shared_slots(x, topk_weights, topk_ids)  # [N, k + S]
        topk_ids = route_padding_nowhere(topk_ids)  # a CUDA graph's padding rows: -1
        out = self.experts(x, topk_weights, topk_ids)  # [N, H]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [N, H]
            if self.shared_expert_gate is not None:
                shared = F.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def _with_shared_slots(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        """Every token's routing plus the S fused shared experts (ids E..E+S-1), weighted 1, or by the token's
        sigmoid gate (Qwen2-MoE)."""
        rows, slots = x.shape[0], self.fused_shared_slots
        ids = self.shared_slot_ids.expand(rows, slots)  # constant buffers: no kernel but the two concatenations
        if self.shared_expert_gate is not None:
            weights = torch.sigmoid(self.shared_expert_gate(x).float()).expand(rows, slots)  # [N, S]
        else:
            weights = self.shared_slot_ones.expand(rows, slots)
        return torch.cat((topk_weights, weights), dim=1), torch.cat((topk_ids, ids.to(topk_ids.dtype)), dim=1)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, experts={self.num_experts}, top_k={self.top_k}, "
                f"H={self.hidden_size}, I={self.intermediate_size}")
