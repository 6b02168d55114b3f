"""Router helpers against independent computations: softmax → top-k (± renormalise) done in float64 by sorting, and
DeepSeek-V3's group-limited sigmoid routing done token by token with Python loops."""

import math

import pytest
import torch

from model.kernels import grouped_sigmoid_topk, softmax_topk


def float64_softmax_topk(logits: torch.Tensor, k: int, renormalize: bool):
    weights, ids = [], []
    for row in logits.double().tolist():
        m = max(row)
        exps = [math.exp(v - m) for v in row]
        total = sum(exps)
        probs = [v / total for v in exps]
        best = sorted(range(len(row)), key=lambda e: -probs[e])[:k]
        w = [probs[e] for e in best]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        weights.append(w)
        ids.append(best)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 60, 4), (16, 128, 8), (9, 64, 6), (4, 5, 5)])
def test_softmax_topk_matches_float64(renormalize, T, E, k):
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E + k)) * 3
    weights, ids = softmax_topk(logits, k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (T, k)
    want_w, want_ids = float64_softmax_topk(logits, k, renormalize)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=2e-6, atol=1e-7)
    if renormalize:
        torch.testing.assert_close(weights.sum(1), torch.ones(T), rtol=0, atol=1e-6)


def test_softmax_topk_on_bf16_logits_computes_in_fp32():
    g = torch.Generator().manual_seed(2)
    # distinct values exactly representable in bf16, so there are no ties for top-k to break either way
    logits = torch.stack([torch.randperm(32, generator=g) * 0.25 - 4.0 for _ in range(11)]).bfloat16()
    weights, ids = softmax_topk(logits, 4, renormalize=False)
    want_w, want_ids = float64_softmax_topk(logits.float(), 4, False)
    assert weights.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "logits,k,message",
    [(torch.randn(8), 2, "must be"), (torch.randn(3, 8), 0, "top_k"), (torch.randn(3, 8), 9, "top_k")],
)
def test_softmax_topk_rejects_bad_arguments(logits, k, message):
    with pytest.raises(ValueError, match=message):
        softmax_topk(logits, k, True)


def deepseek_v3_route(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """Token by token: sigmoid scores; group score = sum of the group's two best biased scores; keep the best
    topk_group groups; pick top_k experts by biased score among them; weights = unbiased scores."""
    T, E = logits.shape
    per_group = E // n_group
    all_w, all_ids = [], []
    for t in range(T):
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits[t].double().tolist()]
        biased = [s + b for s, b in zip(scores, bias.double().tolist())]
        group_score = []
        for g in range(n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(sum(members[:2]))
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:top_k]
        w = [scores[e] for e in chosen]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        all_w.append([v * scale for v in w])
        all_ids.append(chosen)
    return torch.tensor(all_w, dtype=torch.float64), torch.tensor(all_ids)


@pytest.mark.parametrize(
    "E,n_group,topk_group,top_k,renormalize,scale",
    [
        (256, 8, 4, 8, True, 2.5),  # DeepSeek-V3
        (64, 8, 3, 6, False, 1.0),
        (16, 1, 1, 4, True, 1.0),  # one group: plain biased top-k
        (32, 4, 4, 2, True, 1.0),  # every group kept
        (24, 8, 2, 5, True, 1.0),  # top_k > group size: several groups contribute
    ],
)
def test_grouped_sigmoid_topk_matches_brute_force(E, n_group, topk_group, top_k, renormalize, scale):
    g = torch.Generator().manual_seed(E + top_k)
    T = 19
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.5  # large enough to change which experts win
    weights, ids = grouped_sigmoid_topk(logits, bias, top_k, n_group, topk_group, renormalize, scale)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (T, top_k)
    want_w, want_ids = deepseek_v3_route(logits, bias, top_k, n_group, topk_group, renormalize, scale)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=2e-6, atol=1e-7)


def test_grouped_sigmoid_topk_bias_selects_but_does_not_weight():
    """A big bias on expert 0 makes it chosen for every token, yet its weight is its plain sigmoid score."""
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(16)
    bias[0] = 100.0
    weights, ids = grouped_sigmoid_topk(logits, bias, 2, 4, 2, renormalize=False)
    assert (ids[:, 0] == 0).all()
    torch.testing.assert_close(weights[:, 0], torch.sigmoid(logits[:, 0]))


@pytest.mark.parametrize(
    "E,n_group,topk_group,top_k,message",
    [(30, 4, 2, 2, "divisible"), (32, 4, 0, 2, "topk_group"), (32, 4, 5, 2, "topk_group"), (32, 4, 1, 9, "top_k")],
)
def test_grouped_sigmoid_topk_rejects_bad_arguments(E, n_group, topk_group, top_k, message):
    with pytest.raises(ValueError, match=message):
        grouped_sigmoid_topk(torch.randn(3, E), torch.zeros(E), top_k, n_group, topk_group)
