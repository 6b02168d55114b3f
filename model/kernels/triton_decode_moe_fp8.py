"""The FP8 MoE layer (e4m3 weights with 128x128 block scales, `model.kernels.fp8`'s numerics) for decode-sized
batches in two Triton launches and no plan: `triton_decode_moe`'s design for `fused_moe_fp8`, with its default (small
experts) and its switch `STATICMOE_DECODE_MOE`.

Why: on the H100 the FP8 Qwen3-30B-A3B layer at T = 1 took 30.0 µs in a graph against a 12.6 µs byte floor (2.38×;
issue 16's decode target is 1.15×), while at T = 16 it ran at 1.11×: the loss is the fixed launches (quantiser,
plan, combine), not the weight stream.

Numerics as `fused_moe_fp8_reference`: x quantised per (token, 128 columns) by `quantize_fp8_groups`' rule (each
`_up` program re-quantises the groups it reads: 128 values per 32 weight rows, cheap beside the stream); each 128-wide
K block's product of e4m3 values summed in float32 and scaled by x_scale · w_scale; h = act(gate, up) in float32,
kept unquantised in a float32 buffer; `_down` quantises each (slot, 128-column group) of h by the same rule as it
loads it (every `_down` program of a token redoes it: k × I values, from L2), then the same block-scaled sums; the k
slots reduced by a fixed tree in float32, one cast to x's dtype.

- `_up`: programs (slot, BLOCK_I = 32 intermediate columns: `FP8_BLOCK_I`); per step
  GROUPS = 128 / BLOCK_I K blocks of the gate and up rows ([BLOCK_I, GROUPS, 128] e4m3 each, 32 KB for both).
- `_down`: programs (token, BLOCK_H ∈ {8, 16} output columns), all k slots in one [k_pad, BLOCK_H, 128] tile per
  K block (16 KB at k = 8, BLOCK_H = 16). expert_load counted by the column-block-0 programs (int64 atomic adds: exact).
H and I are multiples of 128 (the FP8 op's contract), so a program's rows share one weight-scale block.

`_down` at Qwen3's T = 1 launch (BLOCK_H 8) is 256 programs, about two per SM, each streaming six dependent 8 KB
steps (one K block each, I = 768) with h's quantisation between them. Requesting the next K block's weights before
reducing the current one was tried and measured slower on an H100 (22.4 vs 20.6 µs at Qwen3 T = 1, 83.0 vs 68.2 at
T = 4; benchmarks/NOTES.md "Session 20"), and removed.
"""

import torch

from model.kernels import pdl
from model.kernels.activation import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, Activation
from model.kernels.arrival_counters import triton_interpreted
from model.kernels.fp8 import FP8_BLOCK
from model.kernels.triton_decode_moe import launch_blocks
from model.kernels.triton_fp8_gemv import num_sms

try:
    import triton
    import triton.language as tl

    from model.kernels.triton_decode_moe import _activate
    from model.kernels.pdl import wait_for_predecessor
    from model.kernels.triton_fp8_gemv import _quantize_groups
except ImportError:  # CPU-only installs
    triton = tl = _activate = _quantize_groups = wait_for_predecessor = None

UP_STEP_ROWS = 128  # BLOCK_I x GROUPS: `_up`'s step is [BLOCK_I, GROUPS, 128] e4m3 (16 KB) per gate and up
MIN_BLOCK_H = 8  # `_down` quantises k x 128 values of h per step: below 8 columns that outweighs the weights
# `_up`'s block at every T: the H100 sweep's fastest (NOTES "Session 20"; Qwen3 T=1 19.5 µs at 32 against 20.6 at 8,
# OLMoE 29.0 against 30.0): four K blocks per row and step, rather than more programs
FP8_BLOCK_I = 32


if tl is not None:
    @triton.jit
    def _up(x_ptr, w13_ptr, s13_ptr, b13_ptr, ids_ptr, h_ptr, E, H, I, K_SLOTS: tl.constexpr,
            HAS_BIAS: tl.constexpr, SWIGLU_OAI: tl.constexpr, alpha: tl.constexpr, limit: tl.constexpr,
            SOFT_ROUND: tl.constexpr, BLOCK_I: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        slot = tl.program_id(0)
        i0 = tl.program_id(1) * BLOCK_I
        e = tl.load(ids_ptr + slot).to(tl.int64)
        if (e >= 0) & (e < E):
            t = slot // K_SLOTS
            num_kb = H // 128
            cols = i0 + tl.arange(0, BLOCK_I)  # [BLOCK_I], all < I (I is a multiple of 128 and of BLOCK_I)
            gs = tl.arange(0, GROUPS)
            ks = tl.arange(0, 128)
            gate_rows = w13_ptr + e * 2 * I * H + cols[:, None, None].to(tl.int64) * H  # [BLOCK_I, 1, 1]
            up_rows = gate_rows + I * H
            gate_scales = s13_ptr + (e * (2 * I // 128) + i0 // 128) * num_kb  # this row block's K-block scales
            up_scales = gate_scales + (I // 128) * num_kb
            acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
            for kb in range(0, num_kb, GROUPS):
                g_ok = kb + gs < num_kb  # [GROUPS]
                offs = (kb + gs)[:, None] * 128 + ks[None, :]  # [GROUPS, 128]
                xv = tl.load(x_ptr + t * H + offs, mask=g_ok[:, None], other=0.0).to(tl.float32)
                xq, xs = _quantize_groups(xv, SOFT_ROUND)  # [GROUPS, 128] e4m3, [GROUPS]
                xf = xq.to(tl.float32)[None, :, :]
                mask = g_ok[None, :, None]
                wg = tl.load(gate_rows + offs[None, :, :], mask=mask, other=0.0).to(tl.float32)  # [BI, G, 128]
                wu = tl.load(up_rows + offs[None, :, :], mask=mask, other=0.0).to(tl.float32)
                sg = tl.load(gate_scales + kb + gs, mask=g_ok, other=0.0) * xs  # [GROUPS]
                su = tl.load(up_scales + kb + gs, mask=g_ok, other=0.0) * xs
                acc_g += tl.sum(tl.sum(wg * xf, axis=2) * sg[None, :], axis=1)
                acc_u += tl.sum(tl.sum(wu * xf, axis=2) * su[None, :], axis=1)
            if HAS_BIAS:
                acc_g += tl.load(b13_ptr + e * 2 * I + cols).to(tl.float32)
                acc_u += tl.load(b13_ptr + e * 2 * I + I + cols).to(tl.float32)
            tl.store(h_ptr + slot * I + cols, _activate(acc_g, acc_u, SWIGLU_OAI, alpha, limit))

    @triton.jit
    def _down(h_ptr, w2_ptr, s2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr, load_ptr, E, H, I, K_SLOTS: tl.constexpr,
              K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, SOFT_ROUND: tl.constexpr,
              BLOCK_H: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        t = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK_H
        num_kb = I // 128
        slots = tl.arange(0, K_PAD)
        e = tl.load(ids_ptr + t * K_SLOTS + slots, mask=slots < K_SLOTS, other=-1).to(tl.int64)  # [K_PAD]
        valid = (slots < K_SLOTS) & (e >= 0) & (e < E)
        e = tl.where(valid, e, 0)
        cols = c0 + tl.arange(0, BLOCK_H)  # [BLOCK_H], all < H (a multiple of 128)
        ks = tl.arange(0, 128)
        rows = w2_ptr + e[:, None, None] * H * I + cols[None, :, None].to(tl.int64) * I  # [K_PAD, BLOCK_H, 1]
        h_rows = h_ptr + (t * K_SLOTS + slots[:, None]).to(tl.int64) * I  # [K_PAD, 1]
        scales = s2_ptr + (e * (H // 128) + c0 // 128) * num_kb  # [K_PAD]: this row block's K-block scales
        acc = tl.zeros([K_PAD, BLOCK_H], dtype=tl.float32)
        for kb in range(0, num_kb):
            w = tl.load(rows + kb * 128 + ks[None, None, :], mask=valid[:, None, None], other=0.0)
            hv = tl.load(h_rows + kb * 128 + ks[None, :], mask=valid[:, None], other=0.0)  # [K_PAD, 128] float32
            hq, hs = _quantize_groups(hv, SOFT_ROUND)
            part = tl.sum(w.to(tl.float32) * hq.to(tl.float32)[:, None, :], axis=2)  # [K_PAD, BLOCK_H]
            acc += part * (hs * tl.load(scales + kb, mask=valid, other=0.0))[:, None]
        if HAS_BIAS:
            acc += tl.load(b2_ptr + e[:, None] * H + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        wts = tl.load(wts_ptr + t * K_SLOTS + slots, mask=valid, other=0.0)
        out = tl.sum(acc * wts[:, None], axis=0)  # [BLOCK_H]: a fixed reduction tree over the slots
        tl.store(out_ptr + t * H + cols, out.to(out_ptr.dtype.element_ty))
        if COUNT:
            if c0 == 0:
                tl.atomic_add(load_ptr + e, tl.full([K_PAD], 1, tl.int64), mask=valid)


def decode_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   expert_load: torch.Tensor | None, activation: Activation, w13_bias: torch.Tensor | None = None,
                   w2_bias: torch.Tensor | None = None, blocks: tuple[int, int] | None = None,
                   num_warps: int = 8) -> torch.Tensor:
    """`fused_moe_fp8` for x [T, H] with T·k <= DECODE_MAX_SLOTS (inputs already checked: H, I multiples of 128).
    `blocks` (BLOCK_I, BLOCK_H) overrides `launch_blocks` and `num_warps` the launches' warps (tests, the
    benchmarks)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter, k = two_i // 2, topk_ids.shape[1]
    assert H % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0
    x = x.contiguous()
    w13, w2, s13, s2 = w13.contiguous(), w2.contiguous(), w13_scale.contiguous(), w2_scale.contiguous()
    ids, wts = topk_ids.contiguous(), topk_weights.contiguous()
    h = torch.empty(T * k, inter, dtype=torch.float32, device=x.device)  # [T·k, I], quantised by `_down`
    out = torch.empty_like(x)  # [T, H]
    b13 = w13_bias.contiguous() if w13_bias is not None else x  # a placeholder pointer when there is no bias
    b2 = w2_bias.contiguous() if w2_bias is not None else x
    soft = triton_interpreted()
    block_i, block_h = blocks or launch_blocks(T, k, H, inter, num_sms(x.device), MIN_BLOCK_H,
                                                min_block_i=FP8_BLOCK_I)
    _up[(T * k, inter // block_i)](
        x, w13, s13, b13, ids, h, E, H, inter, K_SLOTS=k, HAS_BIAS=w13_bias is not None,
        SWIGLU_OAI=activation == Activation.SWIGLU_OAI, alpha=SWIGLU_OAI_ALPHA, limit=SWIGLU_OAI_LIMIT,
        SOFT_ROUND=soft, BLOCK_I=block_i, GROUPS=UP_STEP_ROWS // block_i, num_warps=num_warps,
        **pdl.launch(x.is_cuda))
    _down[(T, H // block_h)](
        h, w2, s2, b2, ids, wts, out, expert_load if expert_load is not None else ids, E, H, inter, K_SLOTS=k,
        K_PAD=triton.next_power_of_2(k), HAS_BIAS=w2_bias is not None, COUNT=expert_load is not None,
        SOFT_ROUND=soft, BLOCK_H=block_h, num_warps=num_warps, **pdl.launch(x.is_cuda))
    return out
