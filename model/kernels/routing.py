"""Router helpers: turn router logits into (topk_weights float32 [T, k], topk_ids int32 [T, k]).

- `softmax_topk`: Mixtral / Qwen-MoE / OLMoE.
- `topk_softmax`: gpt-oss (top-k of the (biased) logits, softmax over those k only).
- `grouped_topk`: DeepSeek-V2 (softmax, group-limited greedy), DeepSeek-V3 / GLM-4.5 (sigmoid scores plus a
  per-expert correction bias that steers the choice but not the weights, group-limited, optional renormalisation,
  `routed_scaling_factor`).

All are a few batched torch ops on the logits' device: no host sync and no data-dependent shapes, so a decode step
that routes is CUDA-graph capturable. On a GPU with Triton, `softmax_topk` and `topk_softmax` run as one Triton kernel
(`model.kernels.triton_routing`, E <= 512, k <= 32) instead of up to seven torch kernels; the torch code
(`softmax_topk_reference`, `topk_softmax_reference`) is the reference and the path everywhere else. The kernel breaks
ties toward the lower expert index. `grouped_topk` breaks ties toward the lower expert (and group) index, on
every device, by a stable sort; `torch.topk` leaves ties unspecified (transformers' routers use it, so under exact
ties they may choose another of the tied experts).

`fused_linear_route` takes the router's linear too: decode batches of up to FUSED_DEFAULT_ROWS (2) rows on a GPU (16
with `STATICMOE_ROUTER_FUSED=1`, none with =0) compute logits and routing in one Triton launch
(`model.kernels.triton_router_gemv`, the same rounding of the logits to the model dtype); else the caller runs its
linear and `softmax_topk` / `topk_softmax`.
"""

import functools
import logging
import os
from dataclasses import dataclass

import torch

from model.kernels import triton_router_gemv, triton_routing
from model.kernels.knobs import env_switch

log = logging.getLogger(__name__)
# STATICMOE_ROUTER=torch keeps the torch ops on the GPU; a Triton build failure switches to them for good (logged)
_TRITON_ROUTER = {"on": os.environ.get("STATICMOE_ROUTER", "triton") != "torch"}
_FUSED_ROUTER = {"on": True}  # off for good after a failure of the fused kernel (logged)

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


def _check_logits(router_logits: torch.Tensor, top_k: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={router_logits.shape[1]}]")


def uses_triton_router(router_logits: torch.Tensor, top_k: int) -> bool:
    """Whether `softmax_topk` / `topk_softmax` take the one-kernel Triton path for these logits (on shapes and device
    only)."""
    return router_logits.is_cuda and _TRITON_ROUTER["on"] and triton_routing.available() and \
        triton_routing.supports(router_logits.shape[1], top_k)


def _triton_route(router_logits, top_k, softmax_all, renormalize):
    """The Triton router, or None after a failure (then and from now on: the torch reference)."""
    try:
        return triton_routing.route(router_logits, top_k, softmax_all=softmax_all, renormalize=renormalize)
    except Exception as err:  # as the attention kernels: a Triton build problem falls back, it does not stop serving
        _TRITON_ROUTER["on"] = False
        log.warning("Triton router failed (%r); using torch ops from now on", err)
        return None


def softmax_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE / OLMoE routing: softmax over experts (fp32), top-k, optional renormalise."""
    _check_logits(router_logits, top_k)
    if uses_triton_router(router_logits, top_k):
        routed = _triton_route(router_logits, top_k, True, renormalize)
        if routed is not None:
            return routed
    return softmax_topk_reference(router_logits, top_k, renormalize)


def softmax_topk_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax_topk` in torch ops (unchecked): the CPU path and the Triton kernel's reference."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def check_grouped_routing(num_experts: int, top_k: int, scoring: str, num_groups: int, topk_groups: int,
                          group_score: str) -> None:
    """Raises ValueError for a routing no token could satisfy (e.g. fewer experts in the kept groups than top_k)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"n_group={num_groups} must divide the number of experts {num_experts}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_group={topk_groups} must be in [1, n_group={num_groups}]")
    per_group = num_experts // num_groups
    if not 1 <= top_k <= topk_groups * per_group:
        raise ValueError(f"top_k={top_k} must be in [1, topk_group * experts per group = {topk_groups * per_group}]")
    if num_groups > 1 and group_score == "top2_sum" and per_group < 2:
        raise ValueError("group_score top2_sum needs at least 2 experts per group")


@dataclass(frozen=True)
class GroupedRouting:
    """The options of `grouped_topk` besides top_k and renormalise, as a MoE block holds them."""

    scoring: str = "softmax"
    correction_bias: bool = False  # the block holds an e_score_correction_bias [E]
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scaling_factor: float = 1.0


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values of each row, ties to the lower index (stable sort). [T, k] int64"""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def grouped_topk(
    router_logits: torch.Tensor,  # [T, E], any float dtype; scored in float32
    top_k: int,
    *,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,  # [E] float32, added to the scores for the choice only
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k: experts form `num_groups` equal groups of consecutive ids; each token keeps its
    `topk_groups` best groups (a group scored by its best expert, "max" (DeepSeek-V2), or by the sum of its best two,
    "top2_sum" (DeepSeek-V3)), then its `top_k` best experts among those. Scores and the choice include
    `correction_bias`; the weights are the unbiased scores of the chosen experts, renormalised to sum to 1 if asked,
    times `scaling_factor`."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    check_grouped_routing(num_experts, top_k, scoring, num_groups, topk_groups, group_score)
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(f"correction_bias must be [{num_experts}], got {tuple(correction_bias.shape)}")
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    if topk_groups < num_groups:
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
        if group_score == "max":
            group_scores = grouped.amax(dim=-1)  # [T, G]
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]; values only, so ties do not matter
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, _largest(group_scores, topk_groups), True)
        choice = grouped.masked_fill(~kept.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    ids = _largest(choice, top_k)  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # the epsilon: sigmoid scores may all be ~0
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return weights, ids.to(torch.int32)


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: top-k of the logits, then softmax over those k only (fp32); the weights sum to 1."""
    _check_logits(router_logits, top_k)
    if uses_triton_router(router_logits, top_k):
        routed = _triton_route(router_logits, top_k, False, False)
        if routed is not None:
            return routed
    return topk_softmax_reference(router_logits, top_k)


def topk_softmax_reference(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_softmax` in torch ops (unchecked): the CPU path and the Triton kernel's reference."""
    logits, ids = torch.topk(router_logits.float(), top_k, dim=-1)  # [T, k]
    return torch.softmax(logits, dim=-1), ids.to(torch.int32)


# Rows up to which the fused router is the default: it measured 2.0-3.6 us a layer faster than the linear + Triton
# router at 1-2 rows on every shape and slower from 4 rows on for OLMoE and Qwen3 (H100, benchmarks/NOTES.md session
# 12); its GPU tests passed in session 13 (77 of 77).
FUSED_DEFAULT_ROWS = 2


@functools.cache
def fused_router_rows() -> int:
    """Rows up to which decode batches take `fused_linear_route`'s one launch: FUSED_DEFAULT_ROWS by default,
    STATICMOE_ROUTER_FUSED=1 every size the kernel takes (benchmarks), =0 never (read once per process)."""
    if os.environ.get("STATICMOE_ROUTER_FUSED") is None:
        return FUSED_DEFAULT_ROWS
    return triton_router_gemv.FUSED_MAX_ROWS if env_switch("STATICMOE_ROUTER_FUSED") else 0


def uses_fused_router(x: torch.Tensor, weight: torch.Tensor, top_k: int, bias: torch.Tensor | None = None) -> bool:
    """Whether `fused_linear_route` takes the one-launch Triton path for x [N, H], the router's weight [E, H] and
    bias [E] (of x's dtype, as F.linear requires of them)."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= fused_router_rows() and _FUSED_ROUTER["on"] and \
        _TRITON_ROUTER["on"] and triton_router_gemv.available() and weight.dim() == 2 and weight.dtype == x.dtype and \
        x.dtype in triton_router_gemv.DTYPES and (bias is None or bias.dtype == x.dtype) and \
        weight.shape[1] == x.shape[1] and weight.device == x.device and \
        triton_router_gemv.supports(x.shape[0], weight.shape[0], x.shape[1], top_k)


def fused_linear_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                       softmax_all: bool, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`softmax_topk` (softmax_all, renormalise if asked) or `topk_softmax` of the router's logits x · Wᵀ + bias
    (rounded to x's dtype, as the linear's output is) in one Triton launch where `uses_fused_router`; None where not
    (then and after a failure of the kernel, which switches it off for good: the caller's unfused path)."""
    if not uses_fused_router(x, weight, top_k, bias):
        return None
    try:
        return triton_router_gemv.fused_route(x, weight, bias, top_k, softmax_all=softmax_all,
                                              renormalize=renormalize and softmax_all)
    except Exception as err:  # as the Triton router: a build problem falls back, it does not stop serving
        _FUSED_ROUTER["on"] = False
        log.warning("fused Triton router failed (%r); using the linear and the router from now on", err)
        return None
