"""`fp8_linear` on the CPU: its reference against the tests' own W8A8 implementation (tests/fp8_fixtures.py, float64
block loops), a ragged last block of output rows, bias, leading batch dimensions, and the checks at the boundary."""

import pytest
import torch

from model.kernels.fp8_linear import fp8_linear
from tests.fp8_fixtures import _fake_quant, dequantize_blocks, quantize_blocks


@pytest.mark.parametrize("N, K", [(256, 256), (200, 384), (8, 128)])  # 200 and 8: a ragged last block of rows
def test_matches_the_independent_w8a8_computation(N, K):
    gen = torch.Generator().manual_seed(N + K)
    x = torch.randn(2, 5, K, generator=gen)
    q, scale = quantize_blocks(torch.randn(N, K, generator=gen) / K**0.5)
    bias = torch.randn(N, generator=gen)
    want = (_fake_quant(x.double()) @ dequantize_blocks(q, scale).double().t() + bias.double()).float()
    got = fp8_linear(x, q, scale, bias)
    assert got.shape == (2, 5, N) and got.dtype == torch.float32
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6


def test_bf16_activations_give_bf16_within_its_rounding():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 256, generator=gen).to(torch.bfloat16)
    q, scale = quantize_blocks(torch.randn(384, 256, generator=gen) / 16)
    got = fp8_linear(x, q, scale)
    want = _fake_quant(x.double()) @ dequantize_blocks(q, scale).double().t()
    assert got.dtype == torch.bfloat16
    assert float((got.double() - want).abs().max() / want.abs().max()) < 2**-7


def test_no_rows():
    q, scale = quantize_blocks(torch.randn(256, 128))
    assert fp8_linear(torch.empty(0, 128), q, scale).shape == (0, 256)


def test_checks_name_the_argument():
    q, scale = quantize_blocks(torch.randn(256, 256))
    x = torch.randn(3, 256)
    with pytest.raises(TypeError, match="weight must be float8_e4m3fn"):
        fp8_linear(x, q.float(), scale)
    with pytest.raises(ValueError, match=r"weight_scale must be float32 \[2, 2\]"):
        fp8_linear(x, q, scale[:1])
    with pytest.raises(ValueError, match="input size K=192 to be a multiple of 128"):
        fp8_linear(torch.randn(3, 192), q[:, :192].contiguous(), scale)
    with pytest.raises(ValueError, match=r"bias must be \[256\]"):
        fp8_linear(x, q, scale, torch.zeros(3))
    with pytest.raises(ValueError, match="do not match"):
        fp8_linear(torch.randn(3, 128), q, scale)
