"""The fused router (model/kernels/triton_router_gemv.py) compiled on the GPU at the presets' router shapes: against
the float64 rule and the unfused path (cuBLAS linear, then the Triton router), in CUDA-graph replay, and through
`SparseMoeBlock.route` with STATICMOE_ROUTER_FUSED=1. CPU-side checks: tests/test_triton_router_gemv.py."""

import pytest
import torch
import torch.nn.functional as F

from model.kernels import routing, triton_router_gemv
from tests.router_gemv_checks import MODES, check, check_rounding_tie, exact_data, fused
from tests.triton_fixtures import switch_setter

pytestmark = pytest.mark.gpu

# name: (E, H, k, mode, bias)
PRESETS = {"olmoe": (64, 2048, 8, "softmax", False), "qwen3-30b-a3b": (128, 2048, 8, "renormalize", False),
           "gpt-oss": (32, 2880, 4, "topk_softmax", True), "qwen1.5-moe": (60, 2048, 4, "softmax", False)}
ROWS = (1, 2, 3, 8, 16)


@pytest.fixture
def fused_on(monkeypatch):
    monkeypatch.setitem(routing._FUSED_ROUTER, "on", True)
    yield from switch_setter(monkeypatch, "STATICMOE_ROUTER_FUSED", routing.fused_router_rows, initial="1")


@pytest.fixture
def exact_cublas():
    """cuBLAS may reduce split-K partials of bf16/fp16 GEMMs in that dtype; off, its sums of exact data are exact."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    yield
    matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = saved


def unfused(x, w, b, k, mode):
    logits = F.linear(x, w, b)  # [N, E] in x's dtype, as SparseMoeBlock's gate
    if mode == "topk_softmax":
        return routing.topk_softmax(logits, k)
    return routing.softmax_topk(logits, k, mode == "renormalize")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_exact_data_matches_the_float64_rule_and_the_unfused_path(fused_on, exact_cublas, name, rows, dtype):
    E, H, k, mode, bias = PRESETS[name]
    weights, ids = check(rows, E, H, k, dtype, mode, bias, "cuda")
    x, w, b = exact_data(rows, E, H, getattr(torch, dtype), "cuda", seed=rows * 7919 + E * 31 + H + k, bias=bias)
    assert routing.uses_fused_router(x, w, k)
    got_w, got_ids = routing.fused_linear_route(x, w, b, k, mode != "topk_softmax", mode == "renormalize")
    assert torch.equal(got_w, weights) and torch.equal(got_ids, ids)  # the dispatch runs the same kernel
    want_w, want_ids = unfused(x, w, b, k, mode)
    assert torch.equal(ids, want_ids)  # same logits, same tie rule: the same ids in the same order
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("rows", ROWS)
def test_random_data_matches_the_unfused_path_up_to_the_last_ulp_of_a_logit(fused_on, name, rows):
    """bf16 activations and a router weight of std 0.02 (logits ~N(0, 1)): cuBLAS sums in another order, so a logit
    may round to the neighbouring bf16 value (<= 1 ulp = 2^-7 |logit| apart). Ids equal, in order, wherever the
    float64 logits' top k+1 are >= 2 ulps (2^-6 |logit|) apart; weights within what 1 ulp of every logit moves a
    softmax (2 · 2^-7 · max |logit|). Many draws: at k = 8 of 128 only ~1 row in 5 has no closer pair."""
    E, H, k, mode, bias = PRESETS[name]
    g = torch.Generator(device="cuda").manual_seed(rows + E)
    w = (torch.randn(E, H, device="cuda", generator=g) * 0.02).bfloat16()
    b = (torch.randn(E, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    checked = total = 0
    for _ in range(max(4, 64 // rows)):
        x = torch.randn(rows, H, device="cuda", generator=g).bfloat16()
        weights, ids = fused(x, w, b, k, mode)
        want_w, want_ids = unfused(x, w, b, k, mode)
        exact = x.double() @ w.double().t() + (0 if b is None else b.double())  # [N, E]
        top = exact.sort(1, descending=True).values[:, :k + 1]  # [N, k+1]
        apart = ((top[:, :-1] - top[:, 1:]) >= 2 ** -6 * top[:, :-1].abs()).all(1)  # [N]
        assert torch.equal(ids[apart], want_ids[apart])
        rtol = 2 * 2 ** -7 * exact.abs().max().item() + 1e-5
        torch.testing.assert_close(weights[apart], want_w[apart], rtol=rtol, atol=1e-6)
        checked, total = checked + int(apart.sum()), total + rows
    assert checked >= 0.05 * total, (checked, total)  # not vacuous


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("mode", MODES)
def test_rounding_ties_go_to_the_lower_expert(dtype, mode):
    check_rounding_tie(128, 2048, 8, dtype, mode, "cuda")
    check_rounding_tie(32, 2880, 4, dtype, mode, "cuda")


@pytest.mark.parametrize("splits", [1, 2, 7, 32])
def test_every_split_count_gives_the_rule(splits):
    check(4, 64, 2048, 8, "bfloat16", "renormalize", True, "cuda", splits=splits)


@pytest.mark.parametrize("mode", MODES)
def test_graph_replays_identically_and_leaves_the_counter_at_zero(fused_on, mode):
    """Captured once on static inputs of a decode batch (after an eager call: compile, counter), replayed twice on
    fresh inputs copied in: bitwise what an eager call gives, the same on both replays, the counter back at 0."""
    E, H, k = 128, 2048, 8
    x, w, b = exact_data(4, E, H, torch.bfloat16, "cuda", seed=3)
    route = lambda: routing.fused_linear_route(x, w, b, k, mode != "topk_softmax", mode == "renormalize")  # noqa
    first_w, first_ids = route()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route()
    fresh, _, _ = exact_data(4, E, H, torch.bfloat16, "cuda", seed=4)
    x.copy_(fresh)
    results = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        results.append((weights.clone(), ids.clone()))
        assert int(triton_router_gemv.arrival_counter(x.device).item()) == 0
    eager_w, eager_ids = route()
    for got_w, got_ids in results:
        assert torch.equal(got_w, eager_w) and torch.equal(got_ids, eager_ids)
    assert not torch.equal(results[0][1], first_ids)  # the replays routed the fresh inputs


def test_sparse_moe_block_routes_through_the_fused_kernel(fused_on, exact_cublas, monkeypatch):
    from model.layers.moe import SparseMoeBlock

    calls = []
    kernel = triton_router_gemv.fused_route
    monkeypatch.setattr(triton_router_gemv, "fused_route", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    block = SparseMoeBlock(0, 2048, 64, 8, 64, renormalize=False).cuda().bfloat16()
    x, w, _ = exact_data(2, 64, 2048, torch.bfloat16, "cuda", seed=11, bias=False)
    block.gate.weight.data.copy_(w)
    weights, ids = block.route(x)
    assert calls == [1]
    want_w, want_ids = routing.softmax_topk(block.gate(x), 8, False)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-9)
    block.route(torch.zeros(17, 2048, device="cuda", dtype=torch.bfloat16))  # past the cut: the unfused path
    assert calls == [1]
