"""Block-scaled FP8 GEMM in Triton for the dense FP8 linears: y[M, N] = Σ_kb (xq[:, kb] · wq[:, kb]ᵀ) · xs[:, kb] ·
ws[n // 128, kb], the numerics of `model.kernels.fp8` (1x128 activation groups, 128x128 weight blocks, each
128-wide K block's partial sum scaled and promoted into a float32 accumulator).

Why our own: on the torch 2.11 / CUDA 13 build of the lent H100, cuBLAS refuses the block recipe of
`torch._scaled_mm` (CUBLAS_STATUS_NOT_SUPPORTED from the heuristic, 2026-12-06), so the dense linears of an FP8
model fell back to dequantise-then-matmul: a decode step 3× slower than bf16 (benchmarks/NOTES.md).

One program computes one [BLOCK_M, BLOCK_N] tile over all of K. BLOCK_N divides 128, so a tile's columns share one
weight-scale row. Tiles are chosen from M alone (no autotuning: an autotuner would benchmark inside CUDA-graph
capture): few rows (decode) stream the weight with narrow tiles so that enough programs run; many rows use
128x128 tiles, grouped along M for L2 reuse of the weight.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

FP8_BLOCK = 128


def available() -> bool:
    return triton is not None


def tile_config(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for M rows and N output columns."""
    if m <= 16:
        return 16, 64 if n >= 64 * 264 else 32, 4, 6
    if m <= 64:
        return 64, 64, 4, 5
    return 128, 128, 8, 4


if triton is not None:

    @triton.jit
    def _fp8_block_gemm(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N, K, num_kb,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)  # GROUP_M row tiles sweep the columns together: each weight tile is
        first_m = group * GROUP_M  # read by GROUP_M programs close in time (L2 hits)
        rows_in_group = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        row_ok, col_ok = offs_m < M, offs_n < N
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]  # [BM, 128] e4m3
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [128, BN]: wᵀ, K-major
        a_scales = a_scale_ptr + offs_m.to(tl.int64) * num_kb  # [BM]: row-major [M, K/128]
        b_scales = b_scale_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * num_kb  # this tile's row of [N/128, K/128]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(num_kb):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            sa = tl.load(a_scales + kb, mask=row_ok, other=0.0)
            sb = tl.load(b_scales + kb)
            acc += tl.dot(a, b) * (sa[:, None] * sb)  # one K block's partial sum, promoted in float32
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def fp8_block_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] e4m3 row-major, x_scale [M, K/128] float32 row-major, weight [N, K] e4m3 row-major, weight_scale
    [ceil(N/128), K/128] float32 -> [M, N] out_dtype. Callers check shapes (`fp8_linear` does, once)."""
    M, K = xq.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    block_m, block_n, warps, stages = tile_config(M, N)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_block_gemm[grid](xq, x_scale, weight, weight_scale, bias if bias is not None else out, out, M, N, K, K // FP8_BLOCK,
                          HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK,
                          GROUP_M=8, num_warps=warps, num_stages=stages)
    return out
