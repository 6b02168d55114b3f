"""Decode-sized 16-bit dense linear in Triton: y[M, N] = x · Wᵀ (+ bias) for M <= DECODE_MAX_ROWS rows in one launch,
K split so that the grid fills the GPU and the splits summed in order by the last program of each column tile: the
design and the reduction of `triton_fp8_gemv`, for bf16/fp16 weights (no quantisation).

Why: at one row cuBLAS ran Qwen3-30B-A3B's o_proj (4096 → 2048, 16.8 MB) as a split-K GEMM (8.1 µs) plus a
separate reduction kernel (1.7 µs) against a 5.6 µs byte floor, and its qkv (2048 → 5120, 21 MB) in 9.4 µs against
~7 µs (H100, benchmarks/NOTES.md "Session 19"): ~4.5 µs a layer over the floor, ~0.2 ms of a 4.2 ms batch-1 step.

Where it wins (H100, benchmarks/bench_gemv.py in CUDA graphs, NOTES "Session 20", µs ours vs cuBLAS at M = 1):
linears with K >= 4096 (Qwen3 o 10.6 vs 10.8 and 10.1 vs 10.8 at M = 16, gpt-oss o 12.5 vs 13.9) and LM heads
(Qwen3's 151936 × 2048: 204.5 vs 227.0, at the byte floor); it loses where K is short and N long (Qwen3 qkv 11.5 vs
11.0, gpt-oss qkv 14.4 vs 13.0, OLMoE o 7.9 vs 6.3). So by default it takes those two kinds (`wanted`);
`STATICMOE_DECODE_GEMV=1` takes it for every decode linear, `=0` never.

Programs: cdiv(N, BLOCK_N) column tiles × splits of K (`triton_fp8_gemv.decode_plan` with K in steps of BLOCK_K,
the last step masked where K is not a multiple of it, e.g. gpt-oss's 2880). Each step loads x [BLOCK_M, BLOCK_K] and
W's [BLOCK_K, BLOCK_N] slice (32 KB of bf16 at BLOCK_N = 128) and accumulates `tl.dot` in float32; Triton pipelines
those loads (num_stages). A split writes its float32 partial; the tile's last program to arrive sums the partials
in split order, adds the bias in float32 and rounds once to x's dtype, so the result does not depend on arrival
order and differs from cuBLAS only by float32 summation order. CUDA-graph capturable (one counter buffer per device
reset by its last program, `arrival_counters`; the first call must run outside capture). Under Triton's interpreter
(SOFT_ROUND, as in `triton_fp8_gemv`) the tiles are upcast to float32 before the dot: the interpreter's bf16 dot
returns garbage (~1e10 for unit inputs), its float32 dot is exact products with float32 sums, as on the GPU.
"""

import functools

import torch

from model.kernels import pdl
from model.kernels.arrival_counters import arrival_counters as shared_counters
from model.kernels.arrival_counters import triton_interpreted
from model.kernels.knobs import env_switch
from model.kernels.triton_fp8_gemv import COUNTER_SLOTS, launch_plan, split_buffers

try:
    import triton
    import triton.language as tl

    from model.kernels.triton_fp8_gemv import _finish_tile, _tile_start
except ImportError:  # CPU-only installs
    triton = tl = None

DECODE_MAX_ROWS = 16  # rows up to which `applies` takes this kernel (the FP8 decode linear's cut)
BLOCK_K = 128  # `launch_plan`'s step (the FP8 block width it plans in)
DTYPES = (torch.bfloat16, torch.float16)
WIDE_K = 4096  # K from which it beat cuBLAS at decode rows (the module docstring)
HEAD_ELEMENTS = 1 << 26  # N·K from which a weight is an LM head's size (Qwen3's is 311M), where it also won


@functools.cache
def forced() -> bool | None:
    """`STATICMOE_DECODE_GEMV` (read once per process): 1 every decode linear, 0 none, unset by shape (`wanted`)."""
    return env_switch("STATICMOE_DECODE_GEMV", default=None)


def wanted(weight: torch.Tensor) -> bool:
    """The switch if set, else whether weight [N, K] is of a shape it was measured faster at: K >= WIDE_K or an LM
    head's N·K >= HEAD_ELEMENTS."""
    switch = forced()
    if switch is not None:
        return switch
    n, k = weight.shape
    return k >= WIDE_K or n * k >= HEAD_ELEMENTS


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this kernel for x [..., K]: a CUDA x of at most DECODE_MAX_ROWS rows, x and weight of
    one 16-bit dtype with rows 16-byte aligned (K a multiple of 8), a weight it is `wanted` for, Triton present."""
    return (x.is_cuda and x.dtype in DTYPES and weight.dtype == x.dtype and x.shape[-1] % 8 == 0
            and x.numel() // x.shape[-1] <= DECODE_MAX_ROWS and wanted(weight) and triton is not None)


def arrival_counters(device: torch.device) -> torch.Tensor:
    """The device's int32 tile counters (model/kernels/arrival_counters.py), zero between calls."""
    return shared_counters("16-bit decode linear", device, COUNTER_SLOTS)


if triton is not None:
    @triton.jit
    def _decode_gemm(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K, steps_per_split, split_stride,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SOFT_ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        pid_n, pid_s, num_splits, offs_m, offs_n, offs_k, row_ok, col_ok = _tile_start(M, N, PDL, BLOCK_M, BLOCK_N,
                                                                                       BLOCK_K)
        k_start = pid_s * steps_per_split * BLOCK_K
        k_end = tl.minimum(k_start + steps_per_split * BLOCK_K, K)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * K  # [BM, 1]
        w_cols = w_ptr + offs_n[None, :].to(tl.int64) * K  # [1, BN]: W is [N, K] row-major

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            xv = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            wv = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
            if SOFT_ROUND:  # the interpreter (Triton 3.9): its tl.dot multiplies bf16 bit patterns as integers
                xv, wv = xv.to(tl.float32), wv.to(tl.float32)
            acc = tl.dot(xv, wv, acc)

        _finish_tile(acc, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_s, num_splits, offs_m, offs_n, row_ok,
                     col_ok, N, split_stride, HAS_BIAS, SPLIT, SOFT_ROUND, BLOCK_M, BLOCK_N)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int | None = None, splits: int | None = None) -> torch.Tensor:
    """x [..., K] (at most DECODE_MAX_ROWS rows), weight [N, K] of x's dtype, bias [N] or None -> [..., N] in x's
    dtype. block_n / splits override the plan (tests, benchmark sweeps)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, N = x2.shape[0], weight.shape[0]
    if not 0 < M <= DECODE_MAX_ROWS:
        raise ValueError(f"the 16-bit decode linear takes 1..{DECODE_MAX_ROWS} rows, got {M}")
    block_m, plan_n, plan_splits, per_split = launch_plan(M, N, -(-K // BLOCK_K), x.device, block_n, splits)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(N, plan_n)
    partials, counters = split_buffers(plan_splits, tiles, out, arrival_counters)
    _decode_gemm[(tiles, plan_splits)](
        x2, weight.contiguous(), bias if bias is not None else out, out, partials, counters, M, N, K, per_split,
        M * N, HAS_BIAS=bias is not None, SPLIT=plan_splits > 1, SOFT_ROUND=triton_interpreted(), BLOCK_M=block_m,
        BLOCK_N=plan_n, BLOCK_K=BLOCK_K, num_warps=4, num_stages=3, **pdl.launch(x.is_cuda))
    return out.reshape(*lead, N)
