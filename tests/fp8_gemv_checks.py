"""Checks of the decode FP8 linear (model/kernels/triton_fp8_gemv.py), shared by the CPU tests (run under Triton's
interpreter in a subprocess: TRITON_INTERPRET must be set before the kernels are defined) and the GPU tests.

Each check raises AssertionError with the case in its message. The references:
- `quantize_fp8_groups` (model/kernels/fp8.py) for the fused quantiser, bit for bit;
- the two-step path at the kernel's K-block order: x quantised by `quantize_fp8_groups`, then `triton_fp8_gemm`'s
  kernel at the same tile sizes on each split's K range (weights and scales sliced), the float32 partials summed in
  split order, + bias, cast: bit for bit under the interpreter (on the GPU two kernels' fp8 MMAs may round
  differently inside a K block);
- float64: the dequantised x and W multiplied in float64 (+ bias), within the accumulation error
  (ACCUMULATION_TOL × Σ|x·w| per element) plus the output dtype's rounding. On the GPU the tolerance covers the
  tensor cores' fp8 accumulation inside a 128-wide block (~14 bits kept, DeepSeek-V3 report §3.3.2); under the
  interpreter the dot is a float32 numpy matmul.
"""

import torch

from model.kernels import triton_fp8_gemm, triton_fp8_gemv
from model.kernels.fp8 import (FP8_BLOCK, dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_blocks,
                               quantize_fp8_groups)

ACCUMULATION_TOL = {"cpu": 1e-5, "cuda": 1e-3}  # × Σ|x·w|: float32 sums (CPU); + fp8 MMA accumulation (GPU)
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def random_linear(N: int, K: int, device, seed: int, bias_dtype=None):
    """A block-quantised weight [N, K] with per-block scales spread over ~3 decades, and a bias or None."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) / K**0.5
    w = w * torch.logspace(-1.5, 1.5, -(-N // FP8_BLOCK))[torch.randperm(-(-N // FP8_BLOCK), generator=gen)]\
        .repeat_interleave(FP8_BLOCK)[:N, None]
    q, scale = quantize_fp8_blocks(w)
    bias = None if bias_dtype is None else (torch.randn(N, generator=gen) * 0.3).to(bias_dtype).to(device)
    return q.to(device), scale.to(device), bias


def random_x(M: int, K: int, dtype, device, seed: int) -> torch.Tensor:
    """Rows at different scales, one all-zero 128-group, one outlier group, a negative zero (float16: scales that
    keep the outputs inside its range)."""
    gen = torch.Generator().manual_seed(seed)
    hi = 0 if dtype == torch.float16 else 2
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, hi, M)[torch.randperm(M, generator=gen)][:, None]
    x[0, :FP8_BLOCK] = 0
    x[:, -FP8_BLOCK:] *= 30
    x[M // 2, 3] = -0.0
    return x.to(dtype).to(device)


def quantiser_inputs(dtype, device) -> torch.Tensor:
    """[rows, 1024] covering the rounding decisions: random groups at scales from 1e-30 to 1e30 (where the dtype
    holds them), groups whose amax is 448 (scale exactly 1) holding every e4m3 value and every midpoint between
    neighbours (ties to even), their negatives, a zero group and subnormal-sized values."""
    gen = torch.Generator().manual_seed(7)
    lo, hi = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-3, 3)}[dtype]
    rand = torch.randn(48, 1024, generator=gen) * torch.logspace(lo, hi, 48)[:, None]
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # [127] non-negative e4m3 values
    mids = (grid[1:] + grid[:-1]) / 2  # every tie
    exact = torch.cat([grid, mids, -grid, -mids])
    exact = torch.cat([exact, torch.full((1024 - exact.numel() % 1024,), 448.0)])  # 448 in each group: scale 1
    exact = exact.view(-1, 1024)
    exact[:, ::FP8_BLOCK] = 448.0
    special = torch.zeros(2, 1024)
    special[1] = torch.randn(1024, generator=gen) * (1e-38 if dtype == torch.float32 else 1e-6)
    special[1, ::FP8_BLOCK] = 1.0  # a large amax: the rest quantise towards zero
    x = torch.cat([rand, exact, special]).to(dtype)
    return x.to(device)


def check_quantiser(dtype, device):
    x = quantiser_inputs(dtype, device)
    q, s = triton_fp8_gemv.quantize_rows_fp8_triton(x)
    want_q, want_s = quantize_fp8_groups(x)
    assert torch.equal(s, want_s), (dtype, "scales differ")
    differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).nonzero()
    assert differ.numel() == 0, (dtype, f"{differ.shape[0]} e4m3 codes differ, first at {differ[:3].tolist()}: "
                                        f"x={x[tuple(differ[0])].item()!r}")


def two_step(x, w, ws, bias, out_dtype, block_n: int, splits: int) -> torch.Tensor:
    """The quantise-then-GEMM path at the decode kernel's summation order (module docstring)."""
    M, K = x.shape
    N = w.shape[0]
    xq, xs = quantize_fp8_groups(x)
    num_kb = K // FP8_BLOCK
    per_split = -(-num_kb // splits)
    total = None
    for kb0 in range(0, num_kb, per_split):
        kb1 = min(kb0 + per_split, num_kb)
        cols = slice(kb0 * FP8_BLOCK, kb1 * FP8_BLOCK)
        part = torch.empty(M, N, dtype=torch.float32, device=x.device)
        triton_fp8_gemm._fp8_block_gemm[(-(-N // block_n),)](
            xq[:, cols].contiguous(), xs[:, kb0:kb1].contiguous(), w[:, cols].contiguous(),
            ws[:, kb0:kb1].contiguous(), part, part, M, N, (kb1 - kb0) * FP8_BLOCK, kb1 - kb0, HAS_BIAS=False,
            BLOCK_M=max(16, triton_fp8_gemv.triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=FP8_BLOCK,
            GROUP_M=8, num_warps=4, num_stages=3)
        total = part if total is None else total + part
    if bias is not None:
        total = total + bias.float()
    return total.to(out_dtype)


def float64_reference(x, w, ws, bias):
    """(out, magnitude) in float64: the dequantised product (+ bias) and Σ|x·w| per element (the error scale)."""
    xd = dequantize_fp8_groups(*quantize_fp8_groups(x), torch.float64)
    wd = dequantize_fp8_blocks(w, ws, torch.float64)
    out = xd @ wd.t()
    if bias is not None:
        out = out + bias.double()
    return out, xd.abs() @ wd.abs().t()


def check_linear(M, N, K, dtype="bfloat16", with_bias=True, device="cpu", block_n=None, splits=None, seed=0):
    """The kernel at one shape: bit for bit the two-step path at its plan, and within float32 accumulation of the
    float64 product; the tile counters back at zero."""
    dtype = getattr(torch, dtype)
    w, ws, bias = random_linear(N, K, device, seed=seed + N + K, bias_dtype=dtype if with_bias else None)
    x = random_x(M, K, dtype, device, seed=seed + M)
    got = triton_fp8_gemv.fp8_decode_linear(x, w, ws, bias, dtype, block_n=block_n, splits=splits)
    case = (M, N, K, dtype, with_bias, block_n, splits)
    assert got.shape == (M, N) and got.dtype == dtype, case
    assert bool(got.isfinite().all()), case
    _, plan_n, plan_splits, _ = triton_fp8_gemv.decode_plan(M, N, K, triton_fp8_gemv.num_sms(x.device))
    plan_n = block_n or plan_n
    if splits is not None:
        per = -(-(K // FP8_BLOCK) // splits)
        plan_splits = -(-(K // FP8_BLOCK) // per)
    if x.device.type == "cpu":  # on the GPU the two kernels' fp8 MMAs (their own instruction shapes) keep
        # different bits inside a K block (see the module docstring), so only the float64 bound applies there
        want = two_step(x, w, ws, bias, dtype, plan_n, plan_splits)
        differ = (got.float() != want.float()).sum().item()
        assert differ == 0, (case, plan_n, plan_splits, f"{differ} outputs differ from the two-step path")
    ref, magnitude = float64_reference(x, w, ws, bias)
    err = (got.double() - ref).abs()
    bound = ACCUMULATION_TOL[x.device.type] * magnitude + OUTPUT_ROUNDING[dtype] * ref.abs() + 1e-30
    assert bool((err <= bound).all()), (case, f"max err/bound {(err / bound).max().item():.3g}")
    if plan_splits > 1:
        assert int(triton_fp8_gemv.arrival_counters(x.device).abs().sum()) == 0, (case, "counters not reset")
    return got


def check_dispatch(device):
    """`fp8_linear`'s Triton path: the decode kernel up to DECODE_MAX_ROWS rows (leading batch dimensions kept), the
    block GEMM above; both within the float64 bound. float32: the block GEMM's bf16 cast is not exact under the
    interpreter (module docstring of triton_fp8_gemv)."""
    import importlib

    fl = importlib.import_module("model.kernels.fp8_linear")
    calls = []
    kernel = triton_fp8_gemv.fp8_decode_linear

    def spy(x2, *args, **kwargs):
        calls.append(x2.shape[0])
        return kernel(x2, *args, **kwargs)

    triton_fp8_gemv.fp8_decode_linear = spy
    enabled = fl.decode_linear_enabled
    fl.decode_linear_enabled = lambda: True  # whatever STATICMOE_FP8_DECODE_LINEAR says
    try:
        N, K = 200, 512
        w, ws, bias = random_linear(N, K, device, seed=3, bias_dtype=torch.float32)
        for lead in [(1,), (2, 3), (triton_fp8_gemv.DECODE_MAX_ROWS,), (triton_fp8_gemv.DECODE_MAX_ROWS + 1,)]:
            m = 1
            for d in lead:
                m *= d
            x = random_x(m, K, torch.float32, device, seed=m)
            got = fl._triton_path(x.view(*lead, K), w, ws, bias)
            assert got.shape == (*lead, N), lead
            ref, magnitude = float64_reference(x, w, ws, bias)
            err = (got.reshape(m, N).double() - ref).abs()
            assert bool((err <= ACCUMULATION_TOL[x.device.type] * magnitude).all()), lead
    finally:
        triton_fp8_gemv.fp8_decode_linear = kernel
        fl.decode_linear_enabled = enabled
    assert calls == [1, 6, triton_fp8_gemv.DECODE_MAX_ROWS], calls
