"""The decode FP8 linear (model/kernels/triton_fp8_gemv.py) compiled on a Hopper GPU (pytest -m gpu): the fused
quantiser bit for bit against `quantize_fp8_groups`; at the real shapes (qwen3-30b-a3b qkv/o, DeepSeek-V3 kv_a/q_b/o)
and row counts up to 64, bit for bit against the two-step path at the kernel's K-block order and within the float64
bound (tests/fp8_gemv_checks.py); against `fp8_linear`'s block-GEMM path; the split-K reduction deterministic;
CUDA-graph capture replayed twice on the same input (identical: the tile counters reset themselves) and on new input.

    pytest -m gpu tests/test_triton_fp8_gemv_gpu.py -s      (-s prints the measured errors)
"""

import importlib

import pytest
import torch

from model.kernels import triton_fp8_gemm, triton_fp8_gemv
from tests.fp8_gemv_checks import (check_dispatch, check_linear, check_quantiser, float64_reference, random_linear,
                                   random_x)
from tests.test_triton_fp8_gemv import LINEAR_CASES, REAL_SHAPES

fl = importlib.import_module("model.kernels.fp8_linear")


@pytest.fixture(autouse=True)
def decode_linear_on(monkeypatch):
    """These tests are about the decode kernel: STATICMOE_FP8_DECODE_LINEAR=1, whatever the environment says."""
    monkeypatch.setattr(fl, "decode_linear_enabled", lambda: True)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_quantiser_is_bit_identical(dtype):
    check_quantiser(dtype, "cuda")


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_small_cases_of_the_cpu_test(case):
    m, n, k, dtype, bias, block_n, splits = case
    check_linear(m, n, k, dtype, bias, "cuda", block_n=block_n, splits=splits)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 64])
@pytest.mark.parametrize("name", REAL_SHAPES)
def test_real_shapes_bit_for_bit_and_within_float64(name, m, with_bias):
    n, k = REAL_SHAPES[name]
    check_linear(m, n, k, "bfloat16", with_bias, "cuda", seed=torch.seed() % 2**20)  # fresh data each run


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("name", ["qwen3 o", "dsv3 kv_a"])
def test_other_activation_dtypes(name, dtype):
    n, k = REAL_SHAPES[name]
    for m in (1, 16):
        check_linear(m, n, k, dtype, True, "cuda")


def test_fp8_linear_dispatch():
    check_dispatch("cuda")


@pytest.mark.parametrize("name", ["qwen3 qkv", "dsv3 kv_a"])
def test_agrees_with_the_block_gemm_path(name):
    """Against quantise + `triton_fp8_gemm` at its own tiles (another K order inside the float32 sums): the two
    paths' distance within the sum of their distances to float64."""
    n, k = REAL_SHAPES[name]
    w, ws, bias = random_linear(n, k, "cuda", seed=11, bias_dtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = random_x(m, k, torch.bfloat16, "cuda", seed=m)
        ours = triton_fp8_gemv.fp8_decode_linear(x, w, ws, bias, torch.float32)
        theirs = triton_fp8_gemm.fp8_block_gemm(*fl.quantize_fp8_groups(x), w, ws, bias, torch.float32)
        ref, magnitude = float64_reference(x, w, ws, bias)
        gap = (ours.double() - theirs.double()).abs().max().item()
        spread = ((ours.double() - ref).abs() + (theirs.double() - ref).abs()).max().item()
        print(f"{name} M={m}: decode vs block GEMM {gap:.3g} (their distances to float64 sum to {spread:.3g}; "
              f"max Σ|x·w| {magnitude.max().item():.3g})")
        assert gap <= spread + 1e-6


def test_split_k_reduction_is_deterministic():
    n, k = REAL_SHAPES["dsv3 kv_a"]
    w, ws, bias = random_linear(n, k, "cuda", seed=5, bias_dtype=torch.bfloat16)
    x = random_x(8, k, torch.bfloat16, "cuda", seed=5)
    first = triton_fp8_gemv.fp8_decode_linear(x, w, ws, bias, torch.float32)
    assert triton_fp8_gemv.decode_plan(8, n, k, triton_fp8_gemv.num_sms(x.device))[2] > 1
    for _ in range(20):
        assert torch.equal(triton_fp8_gemv.fp8_decode_linear(x, w, ws, bias, torch.float32), first)


def test_cuda_graph_replays_identically_and_on_new_input():
    """Two linears (kv_a-like many splits, then qwen3 o) captured in one graph: replay twice on the same x gives the
    same bits (a counter left non-zero would make the second replay's last program never reduce); replay on new x
    gives the eager result; the counters are zero after every replay."""
    (n1, k1), (n2, k2) = REAL_SHAPES["dsv3 kv_a"], REAL_SHAPES["qwen3 o"]
    w1, s1, b1 = random_linear(n1, k1, "cuda", seed=1, bias_dtype=torch.bfloat16)
    w2, s2, _ = random_linear(n2, k2, "cuda", seed=2)
    proj = torch.randn(n1, k2, device="cuda", dtype=torch.bfloat16) / n1**0.5  # kv_a's output -> o's input width
    x = random_x(4, k1, torch.bfloat16, "cuda", seed=3)

    def step():
        h = fl.fp8_linear(x, w1, s1, b1)  # [4, 576] through fp8_linear's dispatch
        return fl.fp8_linear(h @ proj, w2, s2)  # [4, 2048]

    if fl.fp8_linear_path(x, w1, s1, b1) != "triton":
        pytest.skip(f"fp8_linear takes {fl.fp8_linear_path(x, w1, s1, b1)} here, not the Triton path")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # compiles, allocates the counters
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    counters = triton_fp8_gemv.arrival_counters(x.device)
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first) and torch.equal(first, eager)
    assert int(counters.abs().sum()) == 0
    x.copy_(random_x(4, k1, torch.bfloat16, "cuda", seed=4))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())
    assert int(counters.abs().sum()) == 0
