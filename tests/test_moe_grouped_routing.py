"""Group-limited routing (DeepSeek-V2 softmax, DeepSeek-V3 / GLM-4.5 sigmoid + correction bias) against
transformers' own router modules and against a per-token reference written here (the choice by sorting each
token's eligible experts, ties to the lower index), on random and tie-heavy logits."""

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from model.kernels import grouped_topk


def reference_route(logits, k, scoring, bias, groups, topk_groups, group_score, renormalize, scale):
    """Per token: float32 scores as the routers compute them, then groups and experts chosen by Python sorting with
    (score descending, index ascending); weights in float64. Returns ids [T][k] and weights [T][k], and whether the
    token has a tie at a boundary (the k-th and k+1-th eligible expert, or the last kept and first dropped group),
    where transformers' torch.topk may pick another of the tied."""
    scores = torch.softmax(logits.float(), -1) if scoring == "softmax" else torch.sigmoid(logits.float())
    choice = scores + (bias if bias is not None else 0.0)  # float32, as the routers add it
    per_group = logits.shape[1] // groups
    all_ids, all_weights, tied = [], [], []
    for t in range(logits.shape[0]):
        c = choice[t]
        group_scores = []
        for g in range(groups):
            members = c[g * per_group : (g + 1) * per_group]
            best = members.topk(2).values if group_score == "top2_sum" else members.max()[None]
            group_scores.append(float(best.sum()))  # a float32 sum, as the routers' .sum()
        order = sorted(range(groups), key=lambda g: (-group_scores[g], g))
        kept = order if topk_groups == groups else order[:topk_groups]
        group_tie = topk_groups < groups and group_scores[order[topk_groups - 1]] == group_scores[order[topk_groups]]
        eligible = [e for g in kept for e in range(g * per_group, (g + 1) * per_group)]
        ranked = sorted(eligible, key=lambda e: (-float(c[e]), e))
        chosen = ranked[:k]
        expert_tie = len(ranked) > k and float(c[ranked[k - 1]]) == float(c[ranked[k]])
        w = [float(scores[t, e]) for e in chosen]
        if renormalize:
            total = sum(w)
            w = [v / total for v in w]
        all_ids.append(chosen)
        all_weights.append([v * scale for v in w])
        tied.append(group_tie or expert_tie)
    return torch.tensor(all_ids), torch.tensor(all_weights, dtype=torch.float64), torch.tensor(tied)


def dense(ids, weights, num_experts):
    """[T, E] with each token's weight at its chosen experts (order-free comparison of two routings)."""
    return torch.zeros(ids.shape[0], num_experts, dtype=torch.float64).scatter_(1, ids.long(), weights.double())


def hf_router(kind, E, k, groups, topk_groups, renormalize, scale, bias):
    """transformers' router with an identity weight (so its input is the logits), hidden size E."""
    common = dict(hidden_size=E, num_experts_per_tok=k, n_group=groups, topk_group=topk_groups,
                  routed_scaling_factor=scale, n_routed_experts=E, num_attention_heads=1, num_key_value_heads=1)
    if kind == "deepseek_v2":
        config = transformers.DeepseekV2Config(**common, topk_method="group_limited_greedy" if groups > 1 else "greedy")
        router = DeepseekV2TopkRouter(config)
    else:
        cls_config, cls_router = {"deepseek_v3": (transformers.DeepseekV3Config, DeepseekV3TopkRouter),
                                  "glm4_moe": (transformers.Glm4MoeConfig, Glm4MoeTopkRouter)}[kind]
        router = cls_router(cls_config(**common, norm_topk_prob=renormalize))
        router.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


# kind, E, k, groups, topk_groups, renormalize, routed_scaling_factor
CASES = {
    "v3_groups": ("deepseek_v3", 32, 6, 8, 3, True, 2.5),  # DeepSeek-V3's proportions (256/8 groups, 4 kept, k 8)
    "v3_no_norm": ("deepseek_v3", 16, 4, 4, 2, False, 1.0),
    "glm_one_group": ("glm4_moe", 16, 4, 1, 1, True, 1.0),  # GLM-4.5: n_group = topk_group = 1
    "glm_scaled": ("glm4_moe", 24, 8, 1, 1, True, 2.5),
    "v2_group_limited": ("deepseek_v2", 16, 3, 4, 2, False, 16.0),  # DeepSeek-V2: softmax, max per group
    "v2_greedy": ("deepseek_v2", 16, 6, 1, 1, False, 1.0),  # V2-Lite: plain greedy
}


def route_both(case, logits, bias):
    kind, E, k, groups, topk_groups, renormalize, scale = CASES[case]
    scoring, group_score = ("softmax", "max") if kind == "deepseek_v2" else ("sigmoid", "top2_sum")
    bias = bias if scoring == "sigmoid" else None
    weights, ids = grouped_topk(logits, k, scoring=scoring, correction_bias=bias, num_groups=groups,
                                topk_groups=topk_groups, group_score=group_score, renormalize=renormalize,
                                scaling_factor=scale)
    with torch.no_grad():
        _, hf_weights, hf_ids = hf_router(kind, E, k, groups, topk_groups, renormalize, scale,
                                          bias if bias is not None else torch.zeros(E))(logits)
    ref = reference_route(logits, k, scoring, bias, groups, topk_groups, group_score, renormalize, scale)
    return (weights, ids), (hf_weights, hf_ids), ref


@pytest.mark.parametrize("case", CASES)
def test_random_logits_match_transformers_router_and_reference(case):
    E = CASES[case][1]
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.3  # large enough to move choices: selection sees it, weights not
    (weights, ids), (hf_weights, hf_ids), (ref_ids, ref_weights, tied) = route_both(case, logits, bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (200, CASES[case][2])
    assert not tied.any()  # continuous random logits: no exact ties
    assert torch.equal(ids.long(), ref_ids)  # same experts in the same order (best first)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense(ids, weights, E), dense(hf_ids, hf_weights, E), rtol=1e-6, atol=1e-7)


def test_bias_changes_the_choice_but_not_the_weights():
    """With a correction bias the chosen set differs from the unbiased one on many tokens, while each chosen
    expert's weight is its unbiased sigmoid score (renormalised)."""
    gen = torch.Generator().manual_seed(2)
    logits, bias = torch.randn(100, 16, generator=gen), torch.randn(16, generator=gen)
    weights, ids = grouped_topk(logits, 4, scoring="sigmoid", correction_bias=bias, renormalize=False)
    _, unbiased = grouped_topk(logits, 4, scoring="sigmoid", renormalize=False)
    changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, unbiased))
    assert changed > 30
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(1, ids.long()))


@pytest.mark.parametrize("case", ["v3_groups", "v3_no_norm", "glm_scaled", "v2_group_limited", "v2_greedy"])
def test_tie_heavy_logits_break_ties_to_the_lower_index(case):
    """Logits and biases on a coarse grid, so many experts and groups tie exactly. Ours equals the reference's
    lower-index choice on every token; transformers (torch.topk, ties unspecified) equals it wherever no tie sits on
    a boundary, and elsewhere picks experts of the same choice scores."""
    E, k = CASES[case][1], CASES[case][2]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (300, E), generator=gen).float() / 2
    bias = torch.randint(0, 2, (E,), generator=gen).float() / 4
    (weights, ids), (hf_weights, hf_ids), (ref_ids, ref_weights, tied) = route_both(case, logits, bias)
    assert tied.sum() > 30  # ties on boundaries really happen here
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-6, atol=1e-7)
    clear = ~tied
    torch.testing.assert_close(dense(ids[clear], weights[clear], E), dense(hf_ids[clear], hf_weights[clear], E),
                               rtol=1e-6, atol=1e-7)


def test_group_tie_keeps_the_lower_group_and_masks_the_rest():
    """Groups 1 and 3 tie for the last kept place (same top-2 sum): group 1 is kept, and group 3's experts 12, 13 are
    not chosen though they score as high as group 1's 4, 5; a group's third-best expert does not count."""
    logits = torch.full((1, 16), -4.0)
    logits[0, [0, 1]] = 3.0  # group 0: best
    logits[0, [4, 5]] = 1.0  # group 1
    logits[0, [12, 13]] = 1.0  # group 3 ties group 1 on top-2 sum...
    logits[0, 15] = 0.9  # ...and its third expert does not count for the group score
    logits[0, 14] = -4.0
    weights, ids = grouped_topk(logits, 4, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum")
    assert ids[0].tolist() == [0, 1, 4, 5]
    logits[0, 15] = 5.0  # now group 3's top-2 sum beats group 1's, and it holds the best expert
    _, ids = grouped_topk(logits, 4, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum")
    assert ids[0].tolist() == [15, 0, 1, 12]


def test_renormalised_weights_sum_to_the_scaling_factor():
    logits = torch.randn(50, 32, generator=torch.Generator().manual_seed(4))
    weights, _ = grouped_topk(logits, 8, scoring="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum",
                              renormalize=True, scaling_factor=2.5)
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), 2.5))


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(20, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    weights, ids = grouped_topk(logits, 4, scoring="sigmoid", renormalize=False)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.sigmoid(logits.float()).gather(1, ids.long()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_groups=3), r"n_group=3 must divide"),
    (dict(num_groups=4, topk_groups=5), r"topk_group=5 must be in \[1, n_group=4\]"),
    (dict(num_groups=4, topk_groups=1, top_k=5), r"top_k=5 must be in \[1, topk_group \* experts per group = 4\]"),
    (dict(scoring="relu"), r"scoring must be one of"),
    (dict(group_score="mean"), r"group_score must be one of"),
    (dict(num_groups=16, topk_groups=2, group_score="top2_sum", top_k=2), r"top2_sum needs at least 2 experts"),
    (dict(correction_bias=torch.zeros(8)), r"correction_bias must be \[16\]"),
])
def test_bad_routing_arguments_raise(kwargs, message):
    kwargs = {"top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        grouped_topk(torch.randn(3, 16), kwargs.pop("top_k"), **kwargs)
