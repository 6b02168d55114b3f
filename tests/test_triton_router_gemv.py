"""The fused router (model/kernels/triton_router_gemv.py) on the CPU: its launch plan, the kernel under Triton's
interpreter against the float64 rule of the unfused path (tests/router_gemv_checks.py), its self-resetting counter,
and `routing.fused_linear_route`'s dispatch (opt-in, decode sizes, fallback). Real shapes on the GPU:
tests/test_triton_router_gemv_gpu.py."""

import logging

import pytest
import torch

from model.kernels import routing, triton_router_gemv
from model.kernels.triton_router_gemv import BLOCK_E, BLOCK_K, REDUCE_BUDGET, launch_warps, plan, route_rows
from model.layers.moe import SparseMoeBlock
from tests.router_gemv_checks import MODES
from tests.triton_fixtures import compile_for_sm90 as sm90_build
from tests.triton_fixtures import needs_triton, run_interpreted, switch_setter

# (N, E, H, k, dtype, mode, bias, splits): H scaled down from 2048/2880 for the interpreter; splits None: the plan's
CASES = [
    (1, 64, 512, 8, "bfloat16", "renormalize", False, None),  # OLMoE-like
    (1, 128, 512, 8, "bfloat16", "renormalize", False, None),  # Qwen3-30B-A3B-like
    (1, 32, 720, 4, "bfloat16", "topk_softmax", True, None),  # gpt-oss-like: bias, H not a multiple of 64
    (4, 60, 256, 4, "bfloat16", "softmax", True, None),  # Qwen1.5-MoE-like: a ragged last expert tile
    (16, 128, 256, 8, "float16", "renormalize", True, None),  # at the cut: the reducer's budget caps the splits
    (7, 64, 200, 2, "float32", "topk_softmax", False, 3),  # float32 (no TF32), a ragged last K step
    (2, 8, 64, 8, "bfloat16", "softmax", False, 1),  # k = E, a single program
    (3, 512, 192, 32, "bfloat16", "renormalize", False, None),  # the routing kernel's limits
    (16, 512, 128, 10, "bfloat16", "softmax", True, None),  # one split (budget), 32 expert tiles
    (9, 33, 130, 3, "float32", "softmax", True, 2),
    (5, 128, 384, 8, "bfloat16", "topk_softmax", False, 6),
]

REAL = {"olmoe": (64, 2048), "qwen3-30b-a3b": (128, 2048), "gpt-oss": (32, 2880), "qwen1.5-moe": (60, 2048)}


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
def test_plan_spreads_the_weight_within_the_reducer_budget(name, rows):
    E, H = REAL[name]
    splits, per_split = plan(rows, E, H)
    num_kb = -(-H // BLOCK_K)
    assert per_split * (splits - 1) < num_kb <= per_split * splits  # H covered, no split empty
    s_pad = 1 << (splits - 1).bit_length()
    assert s_pad * route_rows(rows) * (1 << (E - 1).bit_length()) <= REDUCE_BUDGET
    programs = -(-E // BLOCK_E) * splits
    assert programs <= 2 * triton_router_gemv.TARGET_PROGRAMS
    if rows == 1:
        assert programs >= 64, programs  # a batch-1 weight streams through >= 64 SMs


def test_plan_examples():
    """The numbers the module docstring and the report reason with."""
    assert plan(1, 64, 2048) == (32, 1)  # 4 tiles × 32 splits = 128 programs of 2 KB
    assert plan(1, 128, 2048) == (16, 2)  # 8 × 16 = 128 programs of 4 KB
    assert plan(1, 32, 2880) == (45, 1)  # 2 × 45 = 90 programs of 2 KB
    assert plan(16, 128, 2048) == (4, 8)  # the budget: 4 splits × 16 rows × 128 experts = 8192 floats
    assert route_rows(1) == 2 and route_rows(3) == 4 and route_rows(16) == 16
    # warps: 1 at batch 1 for the presets (the routing's reductions within a warp), 4 at the cut with E = 128
    assert [launch_warps(1, E, 1 << (plan(1, E, H)[0] - 1).bit_length()) for E, H in REAL.values()] == [1] * 4
    assert launch_warps(16, 128, 4) == 4 and launch_warps(4, 64, 32) == 2 and launch_warps(16, 512, 1) == 8


def script(device: str) -> str:
    lines = ["from tests.router_gemv_checks import *\n"]
    lines += [f"check({n}, {e}, {h}, {k}, {d!r}, {m!r}, {b}, {device!r}, splits={s})\n"
              for n, e, h, k, d, m, b, s in CASES]
    for dtype in ("bfloat16", "float16", "float32"):
        for mode in MODES:
            lines.append(f"check_rounding_tie(64, 256, 8, {dtype!r}, {mode!r}, {device!r})\n")
    lines.append(f"check_rounding_tie(128, 320, 4, 'bfloat16', 'renormalize', {device!r})\n")
    # the same call twice, at two split counts: each bitwise equal to itself (the counter reset itself between)
    lines.append(f"a = check(3, 64, 256, 8, 'bfloat16', 'renormalize', True, {device!r}, splits=4, seed=5)\n"
                 f"b = check(3, 64, 256, 8, 'bfloat16', 'renormalize', True, {device!r}, splits=1, seed=5)\n"
                 f"c = check(3, 64, 256, 8, 'bfloat16', 'renormalize', True, {device!r}, splits=4, seed=5)\n"
                 "assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) and torch.equal(a[1], b[1])\n")
    lines.append(f"check_dispatch_rejects({device!r})\n")
    return "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_the_float64_rule():
    run_interpreted(script("cpu"))


@pytest.fixture
def fused_knob(monkeypatch):
    """Sets STATICMOE_ROUTER_FUSED for one test (the value is cached per process) and restores the switches."""
    monkeypatch.setitem(routing._FUSED_ROUTER, "on", True)
    monkeypatch.setitem(routing._TRITON_ROUTER, "on", True)
    yield from switch_setter(monkeypatch, "STATICMOE_ROUTER_FUSED", routing.fused_router_rows)


def _block(router="softmax_topk", bias=False, E=16, H=32, k=4):
    torch.manual_seed(0)
    block = SparseMoeBlock(0, H, E, k, 8, renormalize=True, router=router, router_bias=bias)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


class FakeCuda:
    """Just what `uses_fused_router` asks of x on a GPU: the dispatch test runs on the CPU."""

    def __init__(self, x):
        self.x = x
        self.is_cuda, self.shape, self.dtype, self.device = True, x.shape, x.dtype, x.device

    def dim(self):
        return self.x.dim()


def test_the_fused_router_by_default_up_to_the_default_rows(fused_knob, monkeypatch):
    """Unset: batches of up to FUSED_DEFAULT_ROWS rows (2, where it measured faster); =1: up to the kernel's 16 rows;
    =0: never."""
    assert routing.FUSED_DEFAULT_ROWS == 2
    monkeypatch.setattr(triton_router_gemv, "available", lambda: True)
    w = torch.zeros(16, 32)
    routing.fused_router_rows.cache_clear()
    monkeypatch.delenv("STATICMOE_ROUTER_FUSED", raising=False)
    for cut in (2, 0):
        monkeypatch.setattr(routing, "FUSED_DEFAULT_ROWS", cut)
        routing.fused_router_rows.cache_clear()
        assert [routing.uses_fused_router(FakeCuda(torch.zeros(n, 32)), w, 4) for n in (1, 2, 3, 16)] == \
            [n <= cut for n in (1, 2, 3, 16)]
    fused_knob("1")
    assert [routing.uses_fused_router(FakeCuda(torch.zeros(n, 32)), w, 4) for n in (1, 2, 3, 16, 17)] == \
        [True, True, True, True, False]
    fused_knob("0")
    assert not routing.uses_fused_router(FakeCuda(torch.zeros(1, 32)), w, 4)


def test_the_fused_router_switches(fused_knob, monkeypatch):
    monkeypatch.setattr(triton_router_gemv, "available", lambda: True)
    x, w = FakeCuda(torch.zeros(1, 32)), torch.zeros(16, 32)
    fused_knob("0")
    assert not routing.uses_fused_router(x, w, 4)
    fused_knob("1")
    assert routing.uses_fused_router(x, w, 4)
    monkeypatch.setenv("STATICMOE_ROUTER_FUSED", "0")
    assert routing.uses_fused_router(x, w, 4)  # read once per process
    assert not routing.uses_fused_router(FakeCuda(torch.zeros(17, 32)), w, 4)  # past the cut
    assert not routing.uses_fused_router(FakeCuda(torch.zeros(1, 32)), w.bfloat16(), 4)  # mixed dtypes
    assert not routing.uses_fused_router(x, torch.zeros(513, 32), 4)  # more experts than the router kernel takes
    assert routing.uses_fused_router(x, w, 4, torch.zeros(16))
    assert not routing.uses_fused_router(x, w, 4, torch.zeros(16, dtype=torch.bfloat16))  # a bias of another dtype
    x8, w8 = FakeCuda(torch.zeros(1, 32, dtype=torch.float64)), torch.zeros(16, 32, dtype=torch.float64)
    assert not routing.uses_fused_router(x8, w8, 4)  # float64: no tensor-core dot
    assert not routing.uses_fused_router(torch.zeros(1, 32), w, 4)  # the CPU
    monkeypatch.setattr(triton_router_gemv, "available", lambda: False)
    assert not routing.uses_fused_router(x, w, 4)
    monkeypatch.setattr(triton_router_gemv, "available", lambda: True)
    monkeypatch.setitem(routing._TRITON_ROUTER, "on", False)  # STATICMOE_ROUTER=torch switches it off too
    assert not routing.uses_fused_router(x, w, 4)


@pytest.mark.parametrize("router, bias", [("softmax_topk", False), ("topk_softmax", True)])
def test_route_takes_the_fused_path_and_falls_back_for_good(fused_knob, monkeypatch, caplog, router, bias):
    """With the knob on and the shapes taken (availability monkeypatched), `SparseMoeBlock.route` returns what the
    fused kernel returns, given the gate's weight and bias and the block's routing; a failure of the kernel logs a
    warning and routes the unfused way from then on."""
    fused_knob("1")
    monkeypatch.setattr(routing, "uses_fused_router", lambda x, w, k, b: routing._FUSED_ROUTER["on"])
    calls = []

    def fake_kernel(x, weight, bias_, top_k, softmax_all, renormalize):
        calls.append((weight, bias_, top_k, softmax_all, renormalize))
        return torch.full((x.shape[0], top_k), 0.25), torch.arange(top_k, dtype=torch.int32).expand(x.shape[0], -1)

    monkeypatch.setattr(triton_router_gemv, "fused_route", fake_kernel)
    block = _block(router, bias)
    x = torch.randn(2, 32)
    weights, ids = block.route(x)
    assert torch.equal(weights, torch.full((2, 4), 0.25)) and ids.tolist() == [[0, 1, 2, 3]] * 2
    (weight, bias_, top_k, softmax_all, renormalize), = calls
    assert weight is block.gate.weight and bias_ is block.gate.bias and top_k == 4
    assert softmax_all == (router == "softmax_topk") and renormalize == (router == "softmax_topk")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(triton_router_gemv, "fused_route", broken)
    with caplog.at_level(logging.WARNING, logger="model.kernels.routing"):
        weights, ids = block.route(x)
    assert "fused Triton router failed" in caplog.text and not routing._FUSED_ROUTER["on"]
    logits = block.gate(x)
    want = routing.topk_softmax_reference(logits, 4) if router == "topk_softmax" else \
        routing.softmax_topk_reference(logits, 4, True)
    assert torch.equal(weights, want[0]) and torch.equal(ids, want[1])
    monkeypatch.setattr(triton_router_gemv, "fused_route", fake_kernel)
    block.route(x)
    assert len(calls) == 1  # off for good


def test_default_route_is_the_unfused_path(fused_knob, monkeypatch):
    fused_knob("0")
    monkeypatch.setattr(triton_router_gemv, "fused_route", lambda *a, **k: pytest.fail("fused path taken"))
    block = _block()
    x = torch.randn(3, 32)
    weights, ids = block.route(x)
    want_w, want_ids = routing.softmax_topk_reference(block.gate(x), 4, True)
    assert torch.equal(weights, want_w) and torch.equal(ids, want_ids)


def compile_for_sm90(E: int, rows: int, top_k: int, softmax_all: bool, bias: bool, s_pad: int, warps=None):
    """The fused router compiled for sm_90a on this GPU-less machine with the real launch's constexprs:
    (PTX, cuobjdump's resource line)."""
    names = ["x_ptr", "w_ptr", "bias_ptr", "part_ptr", "count_ptr", "weights_ptr", "ids_ptr", "N", "E", "H",
             "k_per_split"]
    types = ["*bf16", "*bf16", "*bf16", "*fp32", "*i32", "*fp32", "*i32"] + ["i32"] * 4
    e_pad, r = 1 << (E - 1).bit_length(), route_rows(rows)
    consts = dict(HAS_BIAS=bias, INTERPRETED=False, IEEE_DOT=False, TOP_K=top_k,
                  K_PAD=max(2, 1 << (top_k - 1).bit_length()), E_PAD=e_pad, R=r, S_PAD=s_pad,
                  SOFTMAX_ALL=softmax_all, RENORMALIZE=softmax_all, ACCURATE_EXP=True, BLOCK_E=BLOCK_E,
                  BLOCK_K=BLOCK_K)
    return sm90_build(triton_router_gemv._router_gemv_route, names, types, consts, names[:7] + ["H", "k_per_split"],
                      num_warps=warps or triton_router_gemv.launch_warps(rows, E, s_pad))


@needs_triton
@pytest.mark.parametrize("E, rows, top_k, softmax_all, bias", [(64, 1, 8, True, False), (128, 1, 8, True, False),
                                                               (32, 1, 4, False, True), (128, 16, 8, True, False),
                                                               (512, 16, 32, True, False)])
def test_compiles_for_sm90_without_spills(E, rows, top_k, softmax_all, bias):
    """The presets' launches (and the kernel's limits): no local memory (spills), the acq_rel GPU-scope ticket and
    the relaxed reset, libdevice's accurate expf (no ex2.approx) and the IEEE division of the routing."""
    import re

    s_pad = 1 << (plan(rows, E, 2880 if bias else 2048)[0] - 1).bit_length()
    ptx, usage = compile_for_sm90(E, rows, top_k, softmax_all, bias, s_pad)
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    assert local == 0, usage
    assert "atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.relaxed.exch" in ptx
    assert "div.rn.f32" in ptx
    assert "mma.sync" in ptx or "wgmma" in ptx  # the product on the tensor cores
