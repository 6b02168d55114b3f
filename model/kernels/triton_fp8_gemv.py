"""Decode-sized dense FP8 linear in Triton: y[M, N] = x · Wᵀ (+ bias) for few rows (M <= DECODE_MAX_ROWS), one
launch that quantises x itself and splits K so that the grid fills the GPU. The numerics of `model.kernels.fp8` and of
`triton_fp8_gemm` (each 128-wide K block's fp8 partial sum scaled by x_scale · w_scale into a float32 accumulator).

Why: at decode sizes the block GEMM of `triton_fp8_gemm` runs one program per [rows, N] tile over all of K (18
programs for MLA's kv_a 576 x 7168 on 132 SMs) after a separate quantiser launch, and was slower than bf16 cuBLAS
although it streams half the bytes.

**Fused quantisation.** Each program loads its [BLOCK_M, 128] slices of x (bf16/fp16/fp32) and quantises them as
`quantize_fp8_groups` defines: amax = max|v| in float32 clamped to AMAX_FLOOR, scale = amax / 448 (IEEE quotient),
q = v / scale clamped to ±448 and rounded to e4m3, nearest-even. v / scale is the IEEE quotient without a division
per element: y = 1/scale correctly rounded once per group, then q0 = v·y and two remainder corrections
qᵢ₊₁ = fma(fma(-qᵢ, scale, v), y, qᵢ). q0 is within 1.5 ulp of v/scale; the first correction brings it within
1 ulp, so the remainder of the second is exact and, y being RN(1/scale), the second returns RN(v/scale) (Markstein's
theorem; |q| <= 448 and scale >= AMAX_FLOOR/448 keep every step clear of overflow and of subnormals that could reach
an e4m3 value; the tests find no input where the first correction alone differs, the second is the guarantee for
two FMAs). The GPU rounds to e4m3 with the hardware conversion (`cvt.rn.satfinite`). Triton's interpreter
rounds every float downcast half away from zero and drops the mantissa carry (triton 3.9 `_convert_float`), so
under it (SOFT_ROUND) the kernel first rounds onto the e4m3 grid, and its bf16/fp16 outputs onto theirs, with
float32 additions (`_round_to_precision`); the casts then keep those values as they are.
The result is bit-identical to `quantize_fp8_groups` then `triton_fp8_gemm` at the same tile sizes run on each
split's K range, the float32 partials summed in split order (tests/fp8_gemv_checks.py `two_step`).

**Split-K.** Programs: cdiv(N, BLOCK_N) column tiles × `splits` ranges of K blocks (`decode_plan`, from M, N, K and
the SM count only: no autotuner, which would time kernels inside CUDA-graph capture). Each split accumulates its K
range in float32 and writes it to an fp32 workspace [splits, M, N]; then it takes a ticket from its tile's int32
counter (atomic add, acq_rel, GPU scope, after a CTA barrier so all its threads' stores are released). The last to
arrive sums the tile's partials in split order 0, 1, ... (deterministic: independent of arrival order), adds bias,
casts, stores, and puts the counter back to 0, so one zeroed counter buffer per device serves every call and every
CUDA-graph replay. One launch rather than GEMM + a reduction kernel: at decode a dependent launch costs about what
the whole GEMM streams in (~2 µs). The price is that one program reads its tile's whole partial set
(splits × M × BLOCK_N floats), so `decode_plan` caps that at REDUCE_BUDGET floats (32 KB: a few L2 round trips of
four loads in flight). Calls sharing a device's counters must not run concurrently (the engine runs one stream).

**The cut (DECODE_MAX_ROWS = 16).** Every column tile re-quantises its K range of x: BLOCK_M/BLOCK_N e4m3 values
(~12 ALU instructions each) per weight byte streamed, and the reducer's partials grow as M × splits × BLOCK_N. At
16 rows (BLOCK_M = 16, BLOCK_N 32..128) that is <= 0.5 values per byte with up to 16 splits: the weight stream
stays the bound. At 64 rows the quantisation alone is ~2-4 values per byte at tiles narrow enough for the reducer's
budget (the ALU then bounds it), or the splits drop to 1-2 and the grid empties again; so from 17 rows on,
`triton_fp8_gemm` (x quantised once) runs. The kernel itself takes up to 64 rows (tests and the benchmark time it
there, to move the cut with numbers).
"""

import functools

import torch

from model.kernels import pdl
from model.kernels.arrival_counters import arrival_counters as shared_counters
from model.kernels.arrival_counters import triton_interpreted
from model.kernels.fp8 import AMAX_FLOOR, FP8_BLOCK, FP8_MAX

try:
    import triton
    import triton.language as tl

    from model.kernels.pdl import wait_for_predecessor
except ImportError:  # CPU-only installs
    triton = tl = None

DECODE_MAX_ROWS = 16  # fp8_linear's cut (module docstring)
KERNEL_MAX_ROWS = 64  # what the kernel takes at all (BLOCK_M <= 64)
REDUCE_BUDGET = 8192  # floats of partials the last program of a tile reads: splits × M × BLOCK_N
COUNTER_SLOTS = 1 << 16  # column tiles per call: N up to 2M columns at BLOCK_N = 32
BLOCK_NS = (128, 64, 32)  # divisors of 128: a tile's columns share one weight-scale row


def available() -> bool:
    return triton is not None


def decode_plan(m: int, n: int, k: int, num_sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, splits, K blocks per split) for M rows, N columns, K inputs on `num_sms` SMs.
    Aim: >= 2 programs per SM. The widest BLOCK_N (fewest re-quantisations of x) whose grid reaches 3/4 of that aim
    with splits <= REDUCE_BUDGET / (M × BLOCK_N) and >= 1 K block per split; else the BLOCK_N giving most programs.
    splits is then recomputed from the K blocks per split, so no split is empty."""
    block_m = max(16, triton.next_power_of_2(m)) if triton is not None else max(16, 1 << (m - 1).bit_length())
    num_kb = k // FP8_BLOCK
    target = 2 * num_sms
    best = None
    for block_n in BLOCK_NS:
        tiles = -(-n // block_n)
        cap = max(1, REDUCE_BUDGET // (m * block_n))
        want = max(1, min(-(-target // tiles), cap, num_kb))
        per_split = -(-num_kb // want)
        splits = -(-num_kb // per_split)
        plan = (block_m, block_n, splits, per_split)
        if best is None or tiles * splits > best[0]:
            best = (tiles * splits, plan)
        if tiles * splits * 4 >= target * 3:
            return plan
    return best[1]


def launch_plan(m: int, n: int, steps: int, device: torch.device, block_n: int | None = None,
                splits: int | None = None) -> tuple[int, int, int, int]:
    """`decode_plan` for K in `steps` steps of 128 on `device`'s SMs; block_n / splits override its choice (tests,
    benchmark sweeps), splits recomputed so that none is empty."""
    block_m, plan_n, plan_splits, per_split = decode_plan(m, n, steps * FP8_BLOCK, num_sms(device))
    if block_n is not None or splits is not None:
        plan_n = block_n or plan_n
        per_split = -(-steps // (splits or plan_splits))
        plan_splits = -(-steps // per_split)
    return block_m, plan_n, plan_splits, per_split


def split_buffers(splits: int, tiles: int, out: torch.Tensor, counters) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials [splits, M, N], the tile counters from `counters(device)`) for a split launch into out
    [M, N]; placeholders (out itself) for one split, which touches neither."""
    if splits == 1:
        return out, out
    if tiles > COUNTER_SLOTS:
        raise ValueError(f"N={out.shape[1]} needs {tiles} column tiles, more than the {COUNTER_SLOTS} tile counters")
    return torch.empty(splits, *out.shape, dtype=torch.float32, device=out.device), counters(out.device)


@functools.cache
def num_sms(device: torch.device) -> int:
    """SMs of `device`, for the launch plans of the decode-sized Triton kernels (here and `triton_decode_moe`)."""
    if device.type != "cuda":
        return 132  # the interpreter: plan as for an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def arrival_counters(device: torch.device) -> torch.Tensor:
    """The device's int32 tile counters (model/kernels/arrival_counters.py), zero between calls."""
    return shared_counters("FP8 decode linear", device, COUNTER_SLOTS)


if triton is not None:
    _AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
    _FP8_MAX = tl.constexpr(FP8_MAX)

    @triton.jit
    def _round_to_precision(v, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
        """float32 v -> the nearest value (ties to even) of a format with MANTISSA_BITS and normals from
        2^MIN_EXPONENT, as float32: |v| + 1.5·2^(e+23-MANTISSA_BITS) has an ulp of the format's spacing at v's
        exponent e (its subnormal spacing below MIN_EXPONENT). The interpreter's casts round only values already on
        the grid right; |v| far below float32's largest (no overflow of the constant) and no format overflow."""
        bits = v.to(tl.int32, bitcast=True)
        exponent = tl.maximum((bits >> 23) & 0xFF, 127 + MIN_EXPONENT)  # biased
        magic = (((exponent + 23 - MANTISSA_BITS) << 23) | 0x400000).to(tl.float32, bitcast=True)
        rounded = (tl.abs(v) + magic) - magic
        return (rounded.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize_groups(v, SOFT_ROUND: tl.constexpr):
        """v [BM, 128] float32 -> (q [BM, 128] e4m3, scale [BM] float32): `quantize_fp8_groups` of each row. The
        quotient is taken on |v| and v's sign put back last (the remainder steps would turn -0 into +0)."""
        a = tl.abs(v)
        amax = tl.maximum(tl.max(a, axis=1), _AMAX_FLOOR)  # [BM]
        # tl.div_rn: IEEE quotients. With the device's Triton 3.6, tl.math.fdiv ignores ieee_rounding (3.9 honours
        # it) and lowers to an approximate division the interpreter does not show: scales differed on an H100.
        scale = tl.div_rn(amax, tl.full(amax.shape, _FP8_MAX, tl.float32))
        recip = tl.broadcast_to(tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)[:, None], v.shape)  # RN(1/scale)
        s = tl.broadcast_to(scale[:, None], v.shape)
        q = a * recip  # within 1.5 ulp of |v| / scale
        q = tl.fma(tl.fma(-q, s, a), recip, q)  # within 1 ulp
        q = tl.fma(tl.fma(-q, s, a), recip, q)  # RN(|v| / scale): exact remainder, Markstein
        q = tl.minimum(q, _FP8_MAX)
        if SOFT_ROUND:
            q = _round_to_precision(q, 3, -6)  # e4m3
        sign = (v.to(tl.int32, bitcast=True) >> 31) << 31
        q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return q.to(tl.float8e4nv), scale

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, num_kb, SOFT_ROUND: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, kb = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = offs_m < M
        idx = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        q, scale = _quantize_groups(tl.load(x_ptr + idx, mask=row_ok[:, None], other=0.0).to(tl.float32), SOFT_ROUND)
        tl.store(q_ptr + idx, q, mask=row_ok[:, None])
        tl.store(scale_ptr + offs_m * num_kb + kb, scale, mask=row_ok)

    @triton.jit
    def _bias_cast_store(acc, bias_ptr, out_ptr, offs_m, offs_n, out_mask, N, HAS_BIAS: tl.constexpr,
                         SOFT_ROUND: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if SOFT_ROUND:  # the interpreter's float downcast is not round-to-nearest-even (module docstring)
            if out_ptr.dtype.element_ty == tl.bfloat16:
                acc = _round_to_precision(acc, 7, -126)
            elif out_ptr.dtype.element_ty == tl.float16:
                acc = _round_to_precision(acc, 10, -14)
        tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _sum_partials_in_order(part_ptr, offs_m, offs_n, out_mask, N, stride, num_splits,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Σ_s part[s] for s = 0, 1, ... in this order (-0.0: the exact identity of +). The unrolled body is one
        basic block of independent loads, so they are all in flight before the first add (<= 64 registers)."""
        UNROLL: tl.constexpr = max(2, min(8, 8192 // (BLOCK_M * BLOCK_N)))
        tile = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # [BM, BN] of split 0; splits `stride` apart
        total = tl.full((BLOCK_M, BLOCK_N), -0.0, tl.float32)
        last = num_splits - 1
        for s in range(0, num_splits, UNROLL):
            for u in tl.static_range(UNROLL):  # past the last split: its partial again, not added
                p = tl.load(tile + tl.minimum(s + u, last) * stride, mask=out_mask, cache_modifier=".cg")
                total = tl.where(s + u <= last, total + p, total)
        return total

    @triton.jit
    def _tile_start(M, N, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """A decode-linear program's start (this module's kernel and `triton_gemv`'s): the wait of a dependent
        launch (model/kernels/pdl.py), then (column tile, split, splits, row / column / K offsets, row and column
        masks). One row tile: M <= BLOCK_M."""
        wait_for_predecessor(PDL)
        pid_n, pid_s = tl.program_id(0), tl.program_id(1)
        offs_m, offs_n = tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return (pid_n, pid_s, tl.num_programs(1), offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M,
                offs_n < N)

    @triton.jit
    def _finish_tile(acc, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_s, num_splits, offs_m, offs_n, row_ok,
                     col_ok, N, split_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SOFT_ROUND: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """A column tile's float32 sum `acc` over this program's K range, to the output: + bias and cast at once
        without SPLIT; else stored as split pid_s's partial, and the tile's last program to arrive sums the partials
        in split order (module docstring, "Split-K"). Shared with `triton_gemv`."""
        out_mask = row_ok[:, None] & col_ok[None, :]
        if SPLIT:
            mine = part_ptr + pid_s.to(tl.int64) * split_stride  # [splits, M, N]: this split's [M, N]
            tl.store(mine + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:  # the last of this tile: all partials are visible (acquire)
                total = _sum_partials_in_order(part_ptr, offs_m, offs_n, out_mask, N, split_stride, num_splits,
                                               BLOCK_M, BLOCK_N)
                tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # zero for the next call
                _bias_cast_store(total, bias_ptr, out_ptr, offs_m, offs_n, out_mask, N, HAS_BIAS, SOFT_ROUND)
        else:
            _bias_cast_store(acc, bias_ptr, out_ptr, offs_m, offs_n, out_mask, N, HAS_BIAS, SOFT_ROUND)

    @triton.jit
    def _fp8_decode_gemm(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K, num_kb,
                         kb_per_split, split_stride, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                         SOFT_ROUND: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
        pid_n, pid_s, num_splits, offs_m, offs_n, offs_k, row_ok, col_ok = _tile_start(M, N, PDL, BLOCK_M, BLOCK_N,
                                                                                       BLOCK_K)
        kb_start = pid_s * kb_per_split
        kb_end = tl.minimum(kb_start + kb_per_split, num_kb)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * K + (kb_start * BLOCK_K + offs_k)[None, :]  # [BM, 128]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + (kb_start * BLOCK_K + offs_k)[:, None]  # [128, BN]
        w_scales = ws_ptr + ((pid_n * BLOCK_N) // BLOCK_K) * num_kb  # this tile's row of [N/128, K/128]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb_start, kb_end):
            xq, xs = _quantize_groups(tl.load(x_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32), SOFT_ROUND)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            sb = tl.load(w_scales + kb)
            acc += tl.dot(xq, b) * (xs[:, None] * sb)  # as triton_fp8_gemm: one K block, promoted in float32
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        _finish_tile(acc, bias_ptr, out_ptr, part_ptr, count_ptr, pid_n, pid_s, num_splits, offs_m, offs_n, row_ok,
                     col_ok, N, split_stride, HAS_BIAS, SPLIT, SOFT_ROUND, BLOCK_M, BLOCK_N)


def quantize_rows_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel's quantiser alone: x [M, K] -> (q [M, K] e4m3, scale [M, K/128] float32), for the tests
    that hold it bit for bit to `quantize_fp8_groups`."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, K // FP8_BLOCK, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(triton.cdiv(M, 16), K // FP8_BLOCK)](x, q, scale, M, K, K // FP8_BLOCK,
                                                                 SOFT_ROUND=triton_interpreted(), BLOCK_M=16,
                                                                 BLOCK_K=FP8_BLOCK)
    return q, scale


def fp8_decode_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype, *, block_n: int | None = None, splits: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, M <= 64), weight [N, K] e4m3 row-major, weight_scale [ceil(N/128), K/128] float32
    row-major, bias [N] or None -> [M, N] out_dtype. block_n / splits override `decode_plan` (tests, benchmark
    sweeps). Callers check shapes (`fp8_linear` does, once)."""
    x = x.contiguous()
    M, K = x.shape
    if not 0 < M <= KERNEL_MAX_ROWS:
        raise ValueError(f"the FP8 decode linear takes 1..{KERNEL_MAX_ROWS} rows, got {M}")
    N = weight.shape[0]
    num_kb = K // FP8_BLOCK
    block_m, plan_n, plan_splits, per_split = launch_plan(M, N, num_kb, x.device, block_n, splits)
    if 128 % plan_n or plan_n < 16:
        raise ValueError(f"block_n must divide 128 and be >= 16, got {plan_n}")
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    tiles = triton.cdiv(N, plan_n)
    partials, counters = split_buffers(plan_splits, tiles, out, arrival_counters)
    _fp8_decode_gemm[(tiles, plan_splits)](
        x, weight, weight_scale, bias if bias is not None else out, out, partials, counters, M, N, K, num_kb,
        per_split, M * N, HAS_BIAS=bias is not None, SPLIT=plan_splits > 1, SOFT_ROUND=triton_interpreted(),
        BLOCK_M=block_m,
        BLOCK_N=plan_n, BLOCK_K=FP8_BLOCK, num_warps=4, num_stages=3, **pdl.launch(x.is_cuda))
    return out
