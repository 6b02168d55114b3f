"""q/k RMSNorm, rotary and the step's K/V cache write of one attention layer in one Triton launch (issue 21: "fewer,
fuller kernels per decode layer ... QK-norm + rope + KV write").

Why: after the q/k norm + rotary fusion (model/layers/qk_norm_rotary.py) a decode layer still ran it as one or two
Inductor kernels and then `_write_rows_kernel` (model/layers/triton_cache_write.py): Qwen3-30B-A3B 3.3 + 1.2 + 1.5 µs
and OLMoE 5.9 + 1.6 µs a layer at batch 1 on an H100 (benchmarks/NOTES.md, session 19's kernel tables), for a few KB
of data. OLMoE's whole-row norm ran as one program per row, its 2048 channels reduced serially. Here each program
owns one head of one row and reduces what its norm needs itself (its head, or the whole q or k row from L2), so
Qwen3 at batch 1 is 32 + 4 programs in parallel, and the K/V programs write the cache directly.

Programs (row n, head h): h < Hq rotates q's head h into q_out [N, Hq, D]; h >= Hq takes K/V head h - Hq of row
write_rows[n] (AttentionPlan: a padding row re-writes a real row to that row's slot) and stores its normed, rotated
K and its V at cache slot write_slots[n]. The arithmetic is the unfused modules', rounding where they round:
    y = w · rnd(x · rsqrt(mean(x²) + eps))    (RMSNorm: statistics in float32, the scale in the model dtype)
    out[d] = rnd(rnd(y[d] · cos[d]) + rnd(±y[d ± R/2] · sin[d]))  for d < R ("rotate half"), y[d] beyond R
with rnd() the model dtype's rounding, so only the float32 statistics' summation order (and sqrt's rounding) differ
from eager torch. Compiled without FP fusion: with it, LLVM contracted rnd(y·cos) + c into one `fma.rn.bf16`,
skipping the product's rounding, and the H100 test found 10-15% of the outputs several ulps from eager (session 21).
On by default (`STATICMOE_NORM_ROTARY_WRITE=0` turns it off): on an H100 its GPU test passes (21/21) and the batch-1
decode step went from 1.50 to 1.42 ms (OLMoE, 1.86× → 1.75× its floor) and 3.96 to 3.84 ms (Qwen3-30B-A3B, 1.95× →
1.87×), batch 64 7.15 → 6.92 and 23.5 → 23.4 ms (benchmarks/NOTES.md "Session 22", on/off/on/off).
"""

import functools

import torch

from model.kernels import pdl
from model.kernels.arrival_counters import triton_interpreted
from model.kernels.knobs import env_switch
from model.layers.triton_paged import tl, triton

if triton is not None:
    from model.kernels.pdl import wait_for_predecessor
    from model.kernels.triton_fp8_gemv import _round_to_precision

NORMS = {"none": 0, "per_head": 1, "full": 2}  # Attention.qk_norm -> the kernel's NORM
DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def enabled() -> bool:
    """On unless `STATICMOE_NORM_ROTARY_WRITE=0` (read once per process)."""
    return env_switch("STATICMOE_NORM_ROTARY_WRITE", default=True)


if triton is not None:

    @triton.jit
    def _rnd(x, DTYPE: tl.constexpr, SOFT_ROUND: tl.constexpr):
        """x rounded to the model dtype, kept in float32 for the next operation (as torch's 16-bit ops round).
        Under Triton's interpreter (SOFT_ROUND) the downcast is not round-to-nearest-even (triton_fp8_gemv's
        docstring), so x is put on the dtype's grid first."""
        if SOFT_ROUND:
            x = _round_to_precision(x, 7, -126) if DTYPE == tl.bfloat16 else _round_to_precision(x, 10, -14)
        return x.to(DTYPE).to(tl.float32)

    @triton.jit
    def _head(src, head, w_ptr, cos_row, sin_row, dst, eps, WIDTH: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
              NORM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr, DTYPE: tl.constexpr,
              SOFT: tl.constexpr):
        """One head of one q or k row: src points at the row's q (or k) part of WIDTH channels."""
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        partner = tl.where(d < R // 2, d + R // 2, d - R // 2)  # rotate_half's source channel
        partner = tl.where(d < R, partner, d)
        x = tl.load(src + head * D + d, mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(src + head * D + partner, mask=ok, other=0.0).to(tl.float32)
        if NORM == 0:
            y, yp = x, xp
        else:
            if NORM == 1:  # per head (Qwen3)
                inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
                w_off, wp_off = d, partner
            else:  # over the whole q or k row (OLMoE): every head's program reads the row (a few KB, from L2)
                c = tl.arange(0, BLOCK_ROW)
                row = tl.load(src + c, mask=c < WIDTH, other=0.0).to(tl.float32)
                inv = 1.0 / tl.sqrt(tl.sum(row * row, axis=0) / WIDTH + eps)
                w_off, wp_off = head * D + d, head * D + partner
            w = tl.load(w_ptr + w_off, mask=ok, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + wp_off, mask=ok, other=0.0).to(tl.float32)
            y = _rnd(w * _rnd(x * inv, DTYPE, SOFT), DTYPE, SOFT)
            yp = _rnd(wp * _rnd(xp * inv, DTYPE, SOFT), DTYPE, SOFT)
        if R > 0:
            turns = d < R
            cos = tl.load(cos_row + d, mask=turns, other=0.0).to(tl.float32)
            sin = tl.load(sin_row + d, mask=turns, other=0.0).to(tl.float32)
            sign = tl.where(d < R // 2, -1.0, 1.0)
            y = tl.where(turns, _rnd(_rnd(y * cos, DTYPE, SOFT) + _rnd(sign * yp * sin, DTYPE, SOFT), DTYPE, SOFT), y)
        tl.store(dst + d, y.to(dst.dtype.element_ty), mask=ok)

    @triton.jit
    def _norm_rotary_write(qkv_ptr, row_stride, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, cs_stride, q_out_ptr,
                           k_cache_ptr, v_cache_ptr, rows_ptr, slots_ptr, eps, HQ: tl.constexpr, HKV: tl.constexpr,
                           D: tl.constexpr, R: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_ROW: tl.constexpr, SOFT_ROUND: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        DTYPE = q_out_ptr.dtype.element_ty
        if h < HQ:
            _head(qkv_ptr + n * row_stride, h, q_w_ptr, cos_ptr + n * cs_stride, sin_ptr + n * cs_stride,
                  q_out_ptr + (n * HQ + h) * D, eps, HQ * D, D, R, NORM, BLOCK_D, BLOCK_ROW, DTYPE, SOFT_ROUND)
        else:
            hk = h - HQ
            row = tl.load(rows_ptr + n).to(tl.int64)
            slot = tl.load(slots_ptr + n).to(tl.int64)
            _head(qkv_ptr + row * row_stride + HQ * D, hk, k_w_ptr, cos_ptr + row * cs_stride,
                  sin_ptr + row * cs_stride, k_cache_ptr + (slot * HKV + hk) * D, eps, HKV * D, D, R, NORM, BLOCK_D,
                  BLOCK_ROW, DTYPE, SOFT_ROUND)
            d = tl.arange(0, BLOCK_D)
            v = tl.load(qkv_ptr + row * row_stride + (HQ + HKV + hk) * D + d, mask=d < D)
            tl.store(v_cache_ptr + (slot * HKV + hk) * D + d, v.to(v_cache_ptr.dtype.element_ty), mask=d < D)


def available() -> bool:
    return triton is not None


def norm_rotary_write(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, norm: str,
                      q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, write_rows: torch.Tensor,
                      write_slots: torch.Tensor) -> torch.Tensor:
    """qkv [N, (Hq + 2 Hkv) · D] (the fused projection's output, rows of unit inner stride); norm "none", "per_head"
    (weights [D]) or "full" (weights [Hq·D] and [Hkv·D]); cos, sin [N, 1, R] in qkv's dtype; k_cache, v_cache
    [num_slots, Hkv, D] contiguous; write_rows, write_slots [N] int64 (AttentionPlan's). Writes each written row's
    K and V into the caches and returns q [N, Hq, D], normed and rotated."""
    N = qkv.shape[0]
    if qkv.dtype not in DTYPES or qkv.stride(-1) != 1 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv must be 16-bit [N, {(num_heads + 2 * num_kv_heads) * head_dim}] with unit inner "
                         f"stride, got {tuple(qkv.shape)} {qkv.dtype} strides {qkv.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_cache.shape[1:] == v_cache.shape[1:] == (num_kv_heads, head_dim)):
        raise ValueError(f"caches must be contiguous [slots, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    R = cos.shape[-1]
    if R % 2 or R > head_dim or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"cos/sin must be [N, 1, R] with an even R <= {head_dim} and one layout, got "
                         f"{tuple(cos.shape)} strides {cos.stride()} and {sin.stride()}")
    q = torch.empty(N, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if N == 0:
        return q
    weights = (q_weight, k_weight) if norm != "none" else (qkv, qkv)  # placeholder pointers without a norm
    _norm_rotary_write[(N, num_heads + num_kv_heads)](
        qkv, qkv.stride(0), *weights, cos, sin, cos.stride(0), q, k_cache, v_cache, write_rows, write_slots, eps,
        HQ=num_heads, HKV=num_kv_heads, D=head_dim, R=R, NORM=NORMS[norm],
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_ROW=triton.next_power_of_2(num_heads * head_dim) if norm == "full" else 1,
        SOFT_ROUND=triton_interpreted(), num_warps=4, enable_fp_fusion=False, **pdl.launch(qkv.is_cuda))
    return q
