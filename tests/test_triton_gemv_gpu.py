"""The 16-bit decode linear (model/kernels/triton_gemv.py) compiled on a GPU (pytest -m gpu): the CPU test's cases
and the real decode shapes (Qwen3, OLMoE, gpt-oss's K = 2880, DeepSeek-V2-Lite's kv_a, an LM head) within the float64 bound and
deterministic (tests/gemv_checks.py), against cuBLAS, and replayed from a CUDA graph into a poisoned output."""

import pytest
import torch
import torch.nn.functional as F

from model.kernels.triton_gemv import decode_linear
from tests.gemv_checks import check_linear
from tests.test_triton_gemv import CASES

pytestmark = [pytest.mark.gpu, pytest.mark.triton_only]

REAL = {"qwen3 qkv": (5120, 2048), "qwen3 o": (2048, 4096), "olmoe qkv": (6144, 2048), "gpt-oss qkv": (5120, 2880),
        "gpt-oss o": (2880, 4096), "dsv2-lite kv_a": (576, 2048),
        "qwen3 lm_head": (151936, 2048)}  # the LM head takes it by default (triton_gemv.wanted)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_small_cases_of_the_cpu_test(case):
    m, n, k, dtype, bias, block_n, splits = case
    check_linear(m, n, k, dtype, bias, block_n, splits, device="cuda")


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_real_shapes_match_float64_and_cublas(name, m):
    n, k = REAL[name]
    got = check_linear(m, n, k, "bfloat16", name.startswith("gpt-oss"), device="cuda", seed=m)
    gen = torch.Generator(device="cuda").manual_seed(m)  # check_linear's inputs again, for cuBLAS
    x = torch.randn(m, k, generator=gen, device="cuda").bfloat16()
    x[0, : k // 3] = 0.0
    w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).bfloat16()
    b = (torch.randn(n, generator=gen, device="cuda") * 0.3).bfloat16() if name.startswith("gpt-oss") else None
    cublas = F.linear(x, w, b).float()
    # both round one float32 sum to bf16: at most one bf16 step apart (plus float32 order)
    assert ((got.float() - cublas).abs() <= 2.0**-7 * cublas.abs() + 1e-3).all()


def test_graph_replay_overwrites_a_poisoned_output_and_follows_new_input():
    gen = torch.Generator(device="cuda").manual_seed(5)
    w = (torch.randn(2048, 4096, device="cuda", generator=gen) / 64).bfloat16()
    x = torch.randn(1, 4096, device="cuda", generator=gen).bfloat16()
    decode_linear(x, w)  # outside capture: allocates the tile counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_linear(x, w)
    for _ in range(2):  # twice: the tile counters reset themselves
        x.copy_(torch.randn(1, 4096, device="cuda", generator=gen).bfloat16())
        out.fill_(float("nan"))
        graph.replay()
        want = F.linear(x, w).float()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        assert torch.equal(out, decode_linear(x, w))
