"""The GPU-fused small ops (model/layers/fusion.py) against their eager math: on the CPU the eager function runs
unchanged; on the GPU the compiled kernels are within a bf16 implementation's own error of a float32 reference."""

import shutil

import pytest
import torch

from benchmarks.moe_cases import relative_error
from model.layers import fusion
from model.layers.norm import add_rms_norm, rms_norm
from model.layers.rotary import RotaryEmbedding, apply_rotary


def test_cpu_tensors_run_the_eager_function_bit_for_bit():
    x, w = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm.eager(x, w, 1e-6))
    summed, normed = add_rms_norm(x, x, w, 1e-6)
    assert torch.equal(summed, x + x) and torch.equal(normed, rms_norm.eager(x + x, w, 1e-6))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_compiled_add_rms_norm_rounds_the_sum_as_eager_does():
    """Compiled (here by inductor's CPU backend, with the options the GPU uses) the norm must see the bf16-rounded
    sum, as eager and HF compute it: bit for bit the eager result. Without `COMPILE_OPTIONS` about a quarter of the
    normed values differ."""
    gen = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(16, 512, generator=gen).bfloat16() for _ in range(2))
    w = torch.randn(512, generator=gen).bfloat16()
    torch._dynamo.reset()
    summed, normed = fusion.compile_fused(add_rms_norm.eager)(x, delta, w, 1e-6)
    eager_summed, eager_normed = add_rms_norm.eager(x, delta, w, 1e-6)
    assert torch.equal(summed, eager_summed) and torch.equal(normed, eager_normed)


class _Rows:
    """Stands for a tensor of `n` rows on a CUDA device (the policy reads only these two attributes)."""
    is_cuda = True

    def __init__(self, n):
        self.shape = (n, 2048)


def test_eager_steps_use_compiled_kernels_only_for_many_rows(monkeypatch):
    monkeypatch.setattr(fusion, "_enabled", True)
    assert not fusion.use_compiled(_Rows(fusion.EAGER_MIN_ROWS - 1))
    assert fusion.use_compiled(_Rows(fusion.EAGER_MIN_ROWS))
    assert not fusion.use_compiled(torch.zeros(fusion.EAGER_MIN_ROWS, 2))  # a CPU tensor: always eager
    with fusion.for_graph_capture():
        assert fusion.use_compiled(_Rows(1))  # graph warm-up and capture: always compiled
    assert not fusion.use_compiled(_Rows(1))
    monkeypatch.setattr(fusion, "_enabled", False)
    with fusion.for_graph_capture():
        assert not fusion.use_compiled(_Rows(1))  # an eager engine


def _gpu_cases(n: int):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, 2048, device="cuda", generator=gen).bfloat16()
    delta = torch.randn(n, 2048, device="cuda", generator=gen).bfloat16()
    w = (1 + 0.1 * torch.randn(2048, device="cuda", generator=gen)).bfloat16()
    q = torch.randn(n, 16, 128, device="cuda", generator=gen).bfloat16()
    k = torch.randn(n, 4, 128, device="cuda", generator=gen).bfloat16()
    rope = RotaryEmbedding(128, 4096, 1e6).cuda()
    positions = torch.randint(0, 4096, (n,), device="cuda", generator=gen)
    return x, delta, w, q, k, rope, positions


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 64, 513])
def test_gpu_fused_ops_match_float32_reference(n, monkeypatch):
    fusion.set_enabled(True)
    monkeypatch.setattr(fusion, "EAGER_MIN_ROWS", 0)  # the compiled kernels at every size, not only in graphs
    x, delta, w, q, k, rope, positions = _gpu_cases(n)
    got = rms_norm(x, w, 1e-6)
    ref = rms_norm.eager(x.float(), w.float(), 1e-6)
    assert relative_error(got, ref) <= 2 * relative_error(rms_norm.eager(x, w, 1e-6), ref) + 1e-6

    summed, normed = add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(summed, x + delta)
    ref_sum, ref_norm = add_rms_norm.eager(x.float(), delta.float(), w.float(), 1e-6)
    _, eager_norm = add_rms_norm.eager(x, delta, w, 1e-6)
    assert relative_error(normed, ref_norm) <= 2 * relative_error(eager_norm, ref_norm) + 1e-6

    cos, sin = rope(positions, torch.bfloat16)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    ref_q, ref_k = apply_rotary.eager(q.float(), k.float(), cos.float(), sin.float())
    eager_q, eager_k = apply_rotary.eager(q, k, cos, sin)
    assert relative_error(got_q, ref_q) <= 2 * relative_error(eager_q, ref_q) + 1e-6
    assert relative_error(got_k, ref_k) <= 2 * relative_error(eager_k, ref_k) + 1e-6
