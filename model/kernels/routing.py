"""Router helpers: turn router logits into (topk_weights float32 [T, k], topk_ids int32 [T, k])."""

import torch


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE / OLMoE routing: softmax over experts (fp32), top-k, optional renormalise."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={router_logits.shape[1]}]")
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def grouped_sigmoid_topk(
    router_logits: torch.Tensor,  # [T, E]
    correction_bias: torch.Tensor,  # [E]
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores; experts chosen by score + bias inside the best `topk_group` groups
    (a group's score is the sum of its two best biased scores); weights are the unbiased scores."""
    T, E = router_logits.shape
    if E % n_group:
        raise ValueError(f"num_experts={E} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(f"top_k={top_k} exceeds the experts of {topk_group} groups")
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    biased = scores + correction_bias.float()  # [T, E]
    group_scores = biased.view(T, n_group, -1).topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [T, G]
    group_idx = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [T, G]
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)
