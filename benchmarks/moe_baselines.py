"""The peers our op is measured against, on the same inputs and with the same contract as `fused_moe`.

- `grouped_mm_moe`: the `torch._grouped_mm` pipeline (CUTLASS grouped GEMM): argsort permute, grouped GEMM1,
  SiLU·up, grouped GEMM2, then scatter back to (token, slot) order and a weighted sum over the k slots. It counts
  rows with scatter_add (torch.bincount on CUDA syncs with the host), so it is sync-free and graph-capturable.
- `per_expert_loop_moe`: one expert at a time (reads the counts on the host, as such loops do), index_add combine.
"""

import torch
import torch.nn.functional as F


def expert_counts(flat_ids: torch.Tensor, E: int) -> torch.Tensor:
    """Rows per expert [E] int64, without a host sync."""
    counts = torch.zeros(E, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    T, H = x.shape
    k = topk_ids.shape[1]
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat_ids)  # expert-sorted rows (flat token*k + slot indices)
    offs = torch.cumsum(expert_counts(flat_ids, w13.shape[0]), 0).to(torch.int32)  # [E] group ends
    xs = x[order // k]  # [N, H] permuted copy of the activations
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [N, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [N, I]
    ys = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [N, H]
    per_slot = torch.empty_like(ys).index_copy_(0, order, ys).view(T, k, H)  # back to (token, slot) order
    weights = topk_weights.to(x.dtype).unsqueeze(1)  # [T, 1, k]
    return torch.bmm(weights, per_slot).squeeze(1)  # [T, H], fp32 accumulation inside the GEMM


def per_expert_loop_moe(x, w13, w2, topk_weights, topk_ids):
    T, H = x.shape
    k = topk_ids.shape[1]
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids)
    counts = expert_counts(flat_ids, w13.shape[0]).tolist()  # host sync
    flat_weights = topk_weights.reshape(-1)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tokens = rows // k
        gate_up = x[tokens] @ w13[e].t()  # [n, 2I]
        y = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].t()  # [n, H]
        out.index_add_(0, tokens, y.float() * flat_weights[rows, None])
    return out.to(x.dtype)
