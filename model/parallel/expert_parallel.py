"""The experts op of one rank of a parallel model, swapped in for the plain model's (`SparseMoeBlock.experts`):
the static-batching op on the rank's own experts; the router stays the plain block's.

Dispatch is free: after attention's all-reduce every rank holds every token, and the router (a tiny [E, H] matrix,
replicated) routes them identically on all ranks, since all-reduce hands every rank the same bits. Each rank runs
`fused_moe` over all tokens with its own experts (and its columns of each expert when experts are also split); slots
routed to other ranks are skipped. The partial outputs of all ranks (plus the shared expert's, which is
column/row-split over all ranks) are summed by one all-reduce of the block's output (model/parallel/model.py).
docs/parallel.md compares this with all-to-all.
"""

import torch
from torch import nn

from model.kernels import fused_moe


def local_ids(topk_ids: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Expert ids renumbered for experts [start, start + count), with no host sync: slots routed to other ranks
    become -1, which `fused_moe(..., skip_out_of_range_ids=True)` skips on both paths (kernel and reference)."""
    local = topk_ids - start  # [T, k] int32
    return local.masked_fill((local < 0) | (local >= count), -1)


class ShardedExperts(nn.Module):
    """Experts [start, stop) and columns [c0, c1) of each one's intermediate dimension; forward as the plain
    `Experts` (x, topk_weights, topk_ids with global ids) -> this rank's partial output [N, H]. `expert_load` stays
    [E]: the replicated routing is counted whole, so per-expert metrics cover every expert."""

    def __init__(self, num_experts: int, hidden_size: int, experts: tuple[int, int], columns: tuple[int, int]):
        super().__init__()
        self.num_experts = num_experts
        self.expert_start, self.num_local_experts = experts[0], experts[1] - experts[0]
        inter = columns[1] - columns[0]
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local_experts, 2 * inter, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, inter))
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        flat = topk_ids.reshape(-1).long()
        routed = flat >= 0  # -1: a CUDA graph's padding rows (model/layers/padding_rows.py), counted nowhere
        self.expert_load.index_add_(0, flat.clamp(min=0), routed.long())
        if self.num_local_experts != self.num_experts:
            topk_ids = local_ids(topk_ids, self.expert_start, self.num_local_experts)
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                         skip_out_of_range_ids=True)  # [N, H]

    def extra_repr(self) -> str:
        stop = self.expert_start + self.num_local_experts
        return (f"local experts [{self.expert_start}, {stop}) of {self.num_experts}, "
                f"I per rank={self.down_proj.shape[2]}")
