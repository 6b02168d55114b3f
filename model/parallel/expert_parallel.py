"""The MoE block of a parallel model: replicated router, the static-batching op on the rank's own experts, one
all-reduce to combine.

Dispatch is free: after attention's all-reduce every rank holds every token, and the router (a tiny [E, H] matrix,
replicated) routes them identically on all ranks, since all-reduce hands every rank the same bits. Each rank runs
`fused_moe` over all tokens with its own experts (and its columns of each expert when experts are also split); slots
routed to other ranks are skipped. The partial outputs of all ranks (plus the shared expert's, which is
column/row-split over all ranks) are summed by one all-reduce. docs/parallel.md compares this with all-to-all.
"""

import torch
import torch.nn.functional as F

from model.kernels import fused_moe, softmax_topk
from model.layers.moe import Experts, SparseMoeBlock
from model.parallel.comm import Comm


def local_ids(topk_ids: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Expert ids renumbered for experts [start, start + count), with no host sync: slots routed to other ranks
    become -1, which `fused_moe(..., skip_out_of_range_ids=True)` skips on both paths (kernel and reference)."""
    local = topk_ids - start  # [T, k] int32
    return local.masked_fill((local < 0) | (local >= count), -1)


class ExpertParallelMoeBlock(SparseMoeBlock):
    """A `SparseMoeBlock` (same attributes, so metrics and hooks work) holding experts [start, stop) and columns
    [c0, c1) of each expert's intermediate dimension. `expert_load` stays [E]: the replicated routing is counted
    whole on the ranks that count (rank 0), so per-expert metrics cover every expert."""

    def __init__(self, block: SparseMoeBlock, experts: tuple[int, int], columns: tuple[int, int],
                 shared_expert: torch.nn.Module | None, comm: Comm):
        super().__init__(block.layer_idx, block.hidden_size, block.num_experts, block.top_k, block.intermediate_size,
                         block.renormalize)
        self.expert_start, self.num_local_experts = experts[0], experts[1] - experts[0]
        self.experts = Experts(self.num_local_experts, block.hidden_size, columns[1] - columns[0])
        self.experts.expert_load = torch.zeros(block.num_experts, dtype=torch.int64)  # every expert, see above
        self.count_expert_load = True
        if shared_expert is not None:
            self.shared_expert = shared_expert  # its down projection must not reduce: summed with ours below
            self.shared_expert_gate = block.shared_expert_gate
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H]
        router_logits = self.gate(x)  # [N, E]
        topk_weights, topk_ids = softmax_topk(router_logits, self.top_k, self.renormalize)  # [N, k] f32, i32
        if self.count_expert_load:
            flat = topk_ids.reshape(-1).long()
            self.experts.expert_load.index_add_(0, flat, torch.ones_like(flat))
        if self.num_local_experts != self.num_experts:
            topk_ids = local_ids(topk_ids, self.expert_start, self.num_local_experts)
        out = fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, topk_weights, topk_ids,
                        skip_out_of_range_ids=True)  # [N, H]
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # gate replicated: linear
        return self.comm.all_reduce(out)

    def extra_repr(self) -> str:
        stop = self.expert_start + self.num_local_experts
        return (f"{super().extra_repr()}, local experts [{self.expert_start}, {stop}), "
                f"I per rank={self.experts.down_proj.shape[2]}")
