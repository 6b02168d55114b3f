"""The one-kernel Triton routers (model/kernels/triton_routing.py) against the torch reference of
model/kernels/routing.py (`softmax_topk_reference`, `topk_softmax_reference`, themselves checked against float64 in
tests/test_moe_routing.py and tests/test_gpt_oss.py).

On the CPU the kernel runs under Triton's interpreter where Triton is installed (small cases); on the GPU compiled,
through `routing`'s dispatch, at real router widths (E up to 512, k up to 32), and captured in a CUDA graph.
"""

import pytest
import torch

from model.kernels import routing, triton_routing
from tests.triton_fixtures import needs_triton, run_compiled, run_interpreted

CHECK = """
import torch
from model.kernels import routing, triton_routing

def route(logits, k, mode):
    if logits.is_cuda:  # through the public dispatch, which must pick the kernel
        assert routing.uses_triton_router(logits, k)
        return routing.topk_softmax(logits, k) if mode == "topk_softmax" else \\
            routing.softmax_topk(logits, k, mode == "renormalize")
    return triton_routing.route(logits, k, softmax_all=mode != "topk_softmax", renormalize=mode == "renormalize")

def reference(logits, k, mode):
    if mode == "topk_softmax":
        return routing.topk_softmax_reference(logits, k)
    return routing.softmax_topk_reference(logits, k, mode == "renormalize")

def ranked(logits, mode):  # [T, E] float32: what each router ranks, the probabilities or the logits
    return logits.float() if mode == "topk_softmax" else torch.softmax(logits.float(), dim=-1)

def make_logits(T, E, dtype, layout, device, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "slice":  # a column slice: row stride E + 5
        return (torch.randn(T, E + 5, generator=g) * 2.5).to(device, dtype)[:, 2:E + 2]
    if layout == "transposed":  # column-major: expert stride T
        return (torch.randn(E, T, generator=g) * 2.5).to(device, dtype).t()
    return (torch.randn(T, E, generator=g) * 2.5).to(device, dtype)

def near(a, b):  # [T, n] pairs within 1e-6 relative (what either side's rounding may swap)
    return (a - b).abs() <= 1e-6 * torch.maximum(a.abs(), b.abs())

def check(T, E, k, dtype, mode, layout, device, min_exact=0.5):
    dtype = getattr(torch, dtype)
    logits = make_logits(T, E, dtype, layout, device, seed=T * 1000 + E * 10 + k)
    assert layout == "contiguous" or T == 1 or not logits.is_contiguous()  # a single row is contiguous anyway
    weights, ids = route(logits, k, mode)
    want_w, want_ids = reference(logits, k, mode)
    assert weights.shape == ids.shape == (T, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.device == ids.device == logits.device
    ids64 = ids.long()
    assert bool(((ids64 >= 0) & (ids64 < E)).all())
    assert bool((ids64.sort(1).values.diff(1) != 0).all())  # k distinct experts per row
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-9)  # both in descending order

    scores = ranked(logits, mode)  # [T, E]
    top = scores.sort(1, descending=True).values[:, :k + 1]  # [T, k+1]
    # the chosen experts score what the k best score, in order (up to rounding): right set and order even at ties
    torch.testing.assert_close(scores.gather(1, ids64), top[:, :k], rtol=1e-6, atol=0)
    if k < E:
        boundary_tie = near(top[:, k - 1], top[:, k])  # [T]
        any_tie = near(top[:, :-1], top[:, 1:]).any(1)  # [T]
    else:
        boundary_tie = any_tie = near(top[:, :-1], top[:, 1:]).any(1)
    exact = ~any_tie  # no near-tie anywhere in the top k+1: the very same ids in the very same order
    assert torch.equal(ids64[exact], want_ids.long()[exact])
    same_set = ~boundary_tie
    assert torch.equal(ids64[same_set].sort(1).values, want_ids.long()[same_set].sort(1).values)
    assert exact.float().mean() >= min_exact, (T, E, k, dtype, exact.float().mean())
    if mode != "softmax":
        torch.testing.assert_close(weights.sum(1), torch.ones(T, device=device), rtol=0, atol=1e-6)

def check_ties(T, E, k, mode, device):
    # logits in steps of 0.5 over a short range: many exactly equal logits, hence bitwise-equal probabilities;
    # the kernel takes the lower expert first, as a stable descending sort does
    g = torch.Generator().manual_seed(T + E + k)
    logits = (torch.randint(0, 5, (T, E), generator=g) * 0.5).float().to(device)
    stable = logits.sort(dim=1, descending=True, stable=True).indices  # [T, E]
    assert bool((logits.gather(1, stable[:, k - 1:k]) == logits.gather(1, stable[:, k:k + 1])).float().mean() > 0.3)
    weights, ids = route(logits, k, mode)
    assert torch.equal(ids.long(), stable[:, :k])
    want_w, _ = reference(logits, k, mode)  # weights do not depend on which of the tied experts is taken
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-9)

def check_empty(E, k, mode, device):
    weights, ids = route(torch.randn(0, E, device=device).bfloat16(), k, mode)
    assert weights.shape == ids.shape == (0, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
"""

MODES = ("softmax", "renormalize", "topk_softmax")
LAYOUTS = ("contiguous", "slice", "transposed")
EK = [(E, k) for E in (8, 60, 64, 128) for k in (1, 2, 4, 8)]


def small_cases() -> list[tuple]:
    """Every (E, k, mode) once; T, dtype and layout rotate through theirs, so each meets each of the others."""
    cases = []
    for n, ((E, k), mode) in enumerate((ek, mode) for ek in EK for mode in MODES):
        T = (1, 3, 64)[n % 3]
        dtype = ("float32", "bfloat16")[n // 3 % 2]
        cases.append((T, E, k, dtype, mode, LAYOUTS[n // 2 % 3]))
    cases += [(1000, 128, 8, dtype, mode, "slice") for dtype in ("float32", "bfloat16")
              for mode in MODES]
    return cases


def real_cases() -> list[tuple]:
    """Every (E, k, mode) of the grid plus the kernel's limits (E = 512, k = 32), T, dtype and layout rotating
    (each compiled variant costs ~1 s: the full product would be ~2000 cases); then the routers of the presets
    (OLMoE 64/8, Qwen1.5-MoE 60/4, Qwen3-30B-A3B 128/8, gpt-oss 32/4 and 128/4) in every mode and dtype at a
    decode step and a prefill chunk."""
    cases = []
    ek_all = EK + [(256, 8), (512, 10), (512, 32)]
    for n, ((E, k), mode) in enumerate((ek, mode) for ek in ek_all for mode in MODES):
        cases.append(((1, 3, 64, 1000)[n % 4], E, k, ("float32", "bfloat16", "float16")[n // 4 % 3], mode,
                      LAYOUTS[n // 3 % 3]))
    cases += [(T, E, k, dtype, mode, "contiguous") for (E, k) in [(64, 8), (60, 4), (128, 8), (32, 4), (128, 4)]
              for T in (1, 1000) for dtype in ("float32", "bfloat16") for mode in MODES]
    return cases


def min_exact(case) -> float:
    """The share of rows whose top k+1 must hold no near-tie, so that the exact-id check is not vacuous: bf16 and
    fp16 logits tie often among 128 experts and more, and a single row may tie."""
    T, E, k, dtype = case[:4]
    if T < 64:
        return 0.0
    return 0.5 if dtype == "float32" else 0.2 if E * k <= 1024 else 0.0


def script(cases, device: str) -> str:
    lines = [f"check(*{case!r}, {device!r}, min_exact={min_exact(case)})\n" for case in cases]
    for E, k in [(8, 2), (60, 4), (64, 8), (128, 8)]:
        for mode in MODES:
            lines.append(f"check_ties(64, {E}, {k}, {mode!r}, {device!r})\n")
            lines.append(f"check_empty({E}, {k}, {mode!r}, {device!r})\n")
    return CHECK + "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_the_reference_on_cpu():
    run_interpreted(script(small_cases(), "cpu"))


@pytest.mark.gpu
def test_compiled_kernel_matches_the_reference_on_gpu():
    run_compiled(script(small_cases() + real_cases(), "cuda"))


def test_dispatch_takes_the_torch_reference_off_the_gpu():
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    assert not routing.uses_triton_router(logits, 4)
    assert not triton_routing.supports(513, 4) and not triton_routing.supports(64, 33)
    assert triton_routing.supports(512, 32)
    for got, want in [(routing.softmax_topk(logits, 4, True), routing.softmax_topk_reference(logits, 4, True)),
                      (routing.topk_softmax(logits, 4), routing.topk_softmax_reference(logits, 4))]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_routing_replays_in_a_cuda_graph_on_new_logits(router):
    """Captured once on static logits of a decode batch, replayed on fresh logits copied in: the kernel's results,
    with no host sync during capture (capture would fail)."""
    assert routing.uses_triton_router(torch.empty(8, 64, device="cuda"), 8)
    route = (lambda x: routing.softmax_topk(x, 8, True)) if router == "softmax_topk" else \
        (lambda x: routing.topk_softmax(x, 8))
    reference = (lambda x: routing.softmax_topk_reference(x, 8, True)) if router == "softmax_topk" else \
        (lambda x: routing.topk_softmax_reference(x, 8))
    g = torch.Generator(device="cuda").manual_seed(7)
    static = torch.randn(8, 64, device="cuda", generator=g).bfloat16()
    route(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(static)
    for _ in range(3):
        static.copy_(torch.randn(8, 64, device="cuda", generator=g) * 3)
        graph.replay()
        want_w, want_ids = reference(static)
        torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-9)
        tied = (want_w[:, :-1] == want_w[:, 1:]).any(1)  # bf16 logits may tie: the order of ties is ours
        assert torch.equal(ids[~tied], want_ids[~tied])


MODEL_CHECK = """
import tempfile
from pathlib import Path
import torch
from model.kernels import routing, triton_routing
from model.loader import load_model
from tests.model_fixtures import assert_paged_matches_hf, make_hf_model, save_checkpoint

calls = []
kernel = triton_routing.route
def counting(*args, **kwargs):
    calls.append(kwargs["softmax_all"])
    return kernel(*args, **kwargs)
routing.uses_triton_router = lambda logits, k: True  # the kernel on the CPU, interpreted
triton_routing.route = counting
PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
for n, family in enumerate(("olmoe", "qwen3_moe", "gpt_oss")):  # no renormalisation, renormalised, gpt-oss's
    hf = make_hf_model(family, seed=50 + n)
    ours, _ = load_model(str(save_checkpoint(hf, Path(tempfile.mkdtemp()))), dtype=torch.float32)
    assert_paged_matches_hf(ours, hf, PROMPT)
assert True in calls and False in calls
print('ok')
"""


@needs_triton
def test_interpreted_kernel_inside_the_model_matches_transformers():
    """OLMoE, Qwen3-MoE and gpt-oss route through the kernel (interpreted): transformers' logits and greedy tokens."""
    run_interpreted(MODEL_CHECK)
