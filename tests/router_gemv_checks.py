"""Checks of the fused router (model/kernels/triton_router_gemv.py), run under Triton's interpreter on the CPU
(tests/test_triton_router_gemv.py) and compiled on the GPU (tests/test_triton_router_gemv_gpu.py).

The reference is the unfused rule in float64: logits = x · Wᵀ + bias, rounded once to x's dtype, then softmax over
all experts and top-k (renormalised or not), or top-k then softmax over the k (topk_softmax); ties to the lower
expert (a stable descending sort). `exact_data` draws x, W and bias as multiples of 2^-6 (|x| <= 1, |W|, |bias| <=
1/8): every product is a multiple of 2^-12 and every sum stays below 2^12, so any float32 summation order gives the
exact sum. There the kernel must give the reference's ids, in order, ties included, and its weights within float32
rounding.
"""

import torch

from model.kernels import routing, triton_router_gemv

MODES = ("softmax", "renormalize", "topk_softmax")


def exact_data(N, E, H, dtype, device, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-64, 65, (N, H), generator=g) / 64
    w = torch.randint(-8, 9, (E, H), generator=g) / 64
    b = torch.randint(-8, 9, (E,), generator=g) / 64 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731 (exact in every dtype)
    return cast(x), cast(w), cast(b)


def reference(x, w, b, k, mode):
    """(weights float64 [N, k], ids int64 [N, k]) of the unfused rule, in float64 from the rounded logits."""
    logits = x.double() @ w.double().t() + (0 if b is None else b.double())  # [N, E]
    logits = logits.float().to(x.dtype).double()  # exact in float32 on exact data: one rounding to x's dtype
    if mode == "topk_softmax":
        ids = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
        return torch.softmax(logits.gather(1, ids), dim=1), ids
    probs = torch.softmax(logits, dim=1)
    ids = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, ids)
    if mode == "renormalize":
        weights = weights / weights.sum(1, keepdim=True)
    return weights, ids


def fused(x, w, b, k, mode, splits=None):
    return triton_router_gemv.fused_route(x, w, b, k, softmax_all=mode != "topk_softmax",
                                          renormalize=mode == "renormalize", splits=splits)


def check_outputs(weights, ids, want_w, want_ids, N, k):
    assert weights.shape == ids.shape == (N, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long().cpu(), want_ids.long().cpu()), (ids, want_ids)  # the reference runs where x is
    torch.testing.assert_close(weights.double().cpu(), want_w.double().cpu(), rtol=2e-6, atol=1e-12)


def check(N, E, H, k, dtype, mode, bias, device, splits=None, seed=None):
    """The kernel against the float64 rule on exact data; the counter back at 0. Returns the outputs."""
    dtype = getattr(torch, dtype)
    x, w, b = exact_data(N, E, H, dtype, device, seed if seed is not None else N * 7919 + E * 31 + H + k, bias)
    weights, ids = fused(x, w, b, k, mode, splits)
    want_w, want_ids = reference(x, w, b, k, mode)
    check_outputs(weights, ids, want_w, want_ids, N, k)
    assert int(triton_router_gemv.arrival_counter(x.device).item()) == 0
    return weights, ids


def check_rounding_tie(E, H, k, dtype, mode, device):
    """Experts 3 and E-2 score the top two float32 logits, E-2's higher by 2^-10 (x · W[3] = H/64 exactly): rounded
    to bf16/fp16 they tie and expert 3 comes first (rounded, then ranked, ties to the lower expert); in float32
    E-2 comes first. Expert 5 duplicates expert 3's row: an exact tie in every dtype, after 3."""
    dt = getattr(torch, dtype)
    x, w, _ = exact_data(2, E, H, torch.float32, "cpu", seed=E + H + k, bias=False)
    w = w / 4  # the others far below the top two
    x[:] = 1 / 8
    w[3] = 1 / 8
    w[5] = w[3]
    w[E - 2] = w[3]
    w[E - 2, 0] += 1 / 128  # + 2^-10 in the logit: below half an ulp of H/64 in bf16 and fp16
    x, w = x.to(device, dt), w.to(device, dt)
    weights, ids = fused(x, w, None, k, mode)
    want_w, want_ids = reference(x, w, None, k, mode)
    first = [3, 5, E - 2] if dt != torch.float32 else [E - 2, 3, 5]
    assert ids[:, :3].tolist() == [first, first], (ids, dtype)
    check_outputs(weights, ids, want_w, want_ids, 2, k)


def check_dispatch_rejects(device):
    """Shapes the fused path does not take: more rows than the cut, k > E, mixed dtypes."""
    x = torch.zeros(triton_router_gemv.FUSED_MAX_ROWS + 1, 64, device=device)
    w = torch.zeros(8, 64, device=device)
    assert not triton_router_gemv.supports(x.shape[0], 8, 64, 2)
    assert not triton_router_gemv.supports(1, 8, 64, 9)
    assert not routing.uses_fused_router(x[:1], w.bfloat16(), 2)
    try:
        triton_router_gemv.fused_route(x, w, None, 2, True, False)
    except ValueError as err:
        assert "1..16" in str(err)
    else:
        raise AssertionError("17 rows accepted")
