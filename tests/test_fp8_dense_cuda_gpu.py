"""The dense FP8 linear on our CUDA kernel (csrc/moe/dense_fp8.cu: quantiser + the FP8 GEMM2 kernel with one expert)
on a Hopper GPU (pytest -m gpu): against a float32 linear on the dequantised weights and unquantised x, within 2x the
error of `fp8_linear_reference` (same activation quantisation), and within bf16 rounding of that reference; outputs
NaN-poisoned and the workspace 0xFF-filled before each call; every tile kind (decode <= 64 rows, 128-row tiles,
2-CTA clusters from 512) and a ragged last weight block (N = 576); CUDA-graph replay on new x, two linears chained
inside one graph (the PDL chain across calls), `fp8_linear` dispatching to it under STATICMOE_FP8_DENSE=cuda, and
bitwise determinism.

    pytest -m gpu tests/test_fp8_dense_cuda_gpu.py -s      (-s prints the measured errors)
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.moe_cases import relative_error
from model.kernels import extension
from model.kernels.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from model.kernels.fp8_linear import fp8_linear, fp8_linear_reference

fl = importlib.import_module("model.kernels.fp8_linear")  # the module (model.kernels exports the function too)

pytestmark = pytest.mark.gpu

# (N, K): qwen3-30b-a3b qkv and o; DeepSeek-V3 q_b and o; N = 576 = 4.5 weight blocks (MLA's kv_a width)
SHAPES = [(5120, 2048), (2048, 4096), (24576, 1536), (7168, 16384), (576, 7168)]
ROWS = [1, 7, 64, 65, 511, 512, 4096]  # decode tiles up to 64, 128-row tiles, 2-CTA clusters from 512


@pytest.fixture(scope="module")
def linears():
    """One random block-quantised weight (+ bf16 bias) per shape, with its float32 dequantisation; one shape at a
    time in memory (DeepSeek's o_proj dequantised is 470 MB)."""
    cache = {}

    def get(N, K):
        if (N, K) not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            gen = torch.Generator(device="cuda").manual_seed(N * 31 + K)
            w, s = quantize_fp8_blocks(torch.randn(N, K, device="cuda", generator=gen) / K**0.5)
            bias = (torch.randn(N, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
            cache[(N, K)] = (w, s, bias, dequantize_fp8_blocks(w, s))
        return cache[(N, K)]

    return get


def run_poisoned(x, w, s, bias, tiles="choose"):
    M, K = x.shape
    out = torch.full((M, w.shape[0]), float("nan"), dtype=torch.bfloat16, device="cuda")
    ws = torch.empty(extension._C.dense_fp8_workspace_bytes(M, K), dtype=torch.uint8, device="cuda").fill_(0xFF)
    got = extension.dense_fp8_linear_cuda(x, w, s, bias, out=out, workspace=ws, tiles=tiles)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    return got


def check(out, x, w, s, bias, w32):
    """out of the kernel against the float32 truth (2x the same-quantisation reference's error) and against that
    reference itself (bf16 output rounding and summation order only)."""
    assert not out.isnan().any(), "unwritten or NaN outputs"
    truth = F.linear(x.float(), w32) + (0 if bias is None else bias.float())
    same_quant = fp8_linear_reference(x, w, s, bias)  # bf16 out, like the kernel
    err, err_ref = relative_error(out, truth), relative_error(same_quant, truth)
    assert err <= 2 * err_ref + 1e-4, f"relative error {err:.3e} vs same-quantisation reference {err_ref:.3e}"
    exact = fp8_linear_reference(x.float(), w, s, None if bias is None else bias.float())  # float32 out
    close = relative_error(out, exact)
    assert close < 5e-3, f"{close:.3e} from the same-numerics float32 reference: more than bf16 rounding"
    return err, err_ref, close


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("N, K", SHAPES)
def test_cuda_dense_fp8_matches_the_float32_linear(N, K, M, with_bias, linears):
    w, s, bias, w32 = linears(N, K)
    bias = bias if with_bias else None
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)  # fresh data every run
    x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
    err, err_ref, close = check(run_poisoned(x, w, s, bias), x, w, s, bias, w32)
    print(f"M={M} N={N} K={K} bias={with_bias}: rel err {err:.3e} (reference {err_ref:.3e}), vs same numerics "
          f"{close:.2e}")


@pytest.mark.parametrize("tiles", ["decode", "large", "cluster"])
@pytest.mark.parametrize("M", [7, 300, 600])
@pytest.mark.parametrize("N, K", [(576, 7168), (2048, 4096)])
def test_every_tile_kind_at_any_row_count(N, K, M, tiles, linears):
    """The benchmark's tile override: each kind must be right wherever it is forced (a cluster at 7 rows leaves one
    CTA of the pair without rows; decode tiles at 600 rows take 10 M tiles)."""
    w, s, bias, w32 = linears(N, K)
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    check(run_poisoned(x, w, s, bias, tiles=tiles), x, w, s, bias, w32)


def test_outliers_and_zero_groups(linears):
    """Activation groups at very different scales (the per-(row, 128) scales must reach the right rows/blocks)."""
    N, K = 576, 7168
    w, s, bias, w32 = linears(N, K)
    x = torch.randn(70, K, device="cuda")
    x[3, 128:256] = 0  # an all-zero group
    x[5] *= 1e3  # a row far larger than the others
    x[:, 1024:1152] *= 50  # one column group large in every row
    x = x.to(torch.bfloat16)
    check(run_poisoned(x, w, s, bias), x, w, s, bias, w32)


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture (one-time kernel attribute setup)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("M", [7, 512])
def test_graph_replay_on_new_x(M, linears):
    N, K = 576, 7168
    w, s, bias, w32 = linears(N, K)
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    graph, out = capture(lambda: extension.dense_fp8_linear_cuda(x, w, s, bias))
    for seed in range(3):
        x.copy_(torch.randn(M, K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, x, w, s, bias, w32)


def test_two_linears_chained_in_one_graph():
    """h = lin1(x), y = lin2(h): the second call's kernels start under the first GEMM's tail (PDL) and read its
    output; the second workspace may reuse memory of the first."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    w1, s1 = quantize_fp8_blocks(torch.randn(2048, 4096, device="cuda", generator=gen) / 64)
    w2, s2 = quantize_fp8_blocks(torch.randn(5120, 2048, device="cuda", generator=gen) / 45)
    x = torch.randn(300, 4096, device="cuda").to(torch.bfloat16)

    def chain():
        h = extension.dense_fp8_linear_cuda(x, w1, s1)
        return h, extension.dense_fp8_linear_cuda(h, w2, s2)

    graph, (h, y) = capture(chain)
    for seed in range(3):
        x.copy_(torch.randn(300, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(h, fp8_linear_reference(x.float(), w1, s1)) < 5e-3
        assert relative_error(y, fp8_linear_reference(h.float(), w2, s2)) < 5e-3
    h_eager, y_eager = chain()
    assert torch.equal(h_eager, h) and torch.equal(y_eager, y), "graph and eager runs differ"


def test_fp8_linear_dispatches_to_it_under_the_knob(monkeypatch, linears):
    device = torch.device("cuda", torch.cuda.current_device())
    if fl.block_scaled_mm_supported(device):
        pytest.skip("this torch build takes block torch._scaled_mm, which fp8_linear prefers")
    monkeypatch.setenv("STATICMOE_FP8_DENSE", "cuda")
    fl.dense_fp8_kernel.cache_clear()
    try:
        w, s, bias, w32 = linears(5120, 2048)
        x = torch.randn(2, 9, 2048, device="cuda").to(torch.bfloat16)  # leading batch dimensions
        assert fl.dense_fp8_path(device) == "cuda"
        assert fl.fp8_linear_path(x, w, s, bias) == "cuda"
        got = fp8_linear(x, w, s, bias)
        assert got.shape == (2, 9, 5120) and got.dtype == torch.bfloat16
        check(got.reshape(18, 5120), x.reshape(18, 2048), w, s, bias, w32)
    finally:
        fl.dense_fp8_kernel.cache_clear()


def test_deterministic_bitwise(linears):
    w, s, bias, _ = linears(2048, 4096)
    x = torch.randn(1000, 4096, device="cuda").to(torch.bfloat16)
    a = extension.dense_fp8_linear_cuda(x, w, s, bias)
    b = extension.dense_fp8_linear_cuda(x, w, s, bias)
    assert torch.equal(a, b)
