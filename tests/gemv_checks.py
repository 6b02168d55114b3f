"""Checks of the 16-bit decode linear (model/kernels/triton_gemv.py), shared by the CPU test (under Triton's
interpreter in a subprocess) and the GPU test: the output against x · Wᵀ (+ bias) in float64 within float32
accumulation (ACCUMULATION_TOL × Σ|x·w| per element) plus the output dtype's rounding, a poisoned output fully
overwritten, and the same bits from a second call (the splits are summed in a fixed order)."""

import torch

from model.kernels.triton_gemv import decode_linear

ACCUMULATION_TOL = 1e-5  # × Σ|x·w|: float32 products of 16-bit values are exact, their sums round
OUTPUT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_linear(M, N, K, dtype, bias, block_n=None, splits=None, device="cpu", seed=0):
    dev, dt = torch.device(device), getattr(torch, dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(M, K, generator=gen, device=dev).to(dt)
    x[0, : K // 3] = 0.0  # a zero stretch: sums of exact zeros must stay exact
    w = (torch.randn(N, K, generator=gen, device=dev) / K**0.5).to(dt)
    b = (torch.randn(N, generator=gen, device=dev) * 0.3).to(dt) if bias else None
    ref = x.double() @ w.double().t() + (b.double() if bias else 0.0)
    spread = x.double().abs() @ w.double().abs().t()
    got = decode_linear(x, w, b, block_n=block_n, splits=splits)
    assert got.shape == (M, N) and got.dtype == dt, (got.shape, got.dtype)
    err = (got.double() - ref).abs()
    tol = OUTPUT_ROUNDING[dt] * ref.abs() + ACCUMULATION_TOL * spread + 1e-6
    assert (err <= tol).all(), (M, N, K, dtype, bias, block_n, splits, (err - tol).max().item())
    again = decode_linear(x, w, b, block_n=block_n, splits=splits)
    assert torch.equal(got, again), "the splits must be summed in a fixed order"
    return got
