"""The router helper against an independent computation: softmax → top-k (± renormalise) done in float64 by
sorting."""

import math

import pytest
import torch

from model.kernels import softmax_topk


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

