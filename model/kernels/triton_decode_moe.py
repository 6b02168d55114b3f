"""The 16-bit MoE layer for decode-sized batches (T·k <= DECODE_MAX_SLOTS routed slots) in two Triton launches and no
routing plan. The default for small experts (H·I <= AUTO_MAX_EXPERT_ELEMENTS, `wanted`); `STATICMOE_DECODE_MOE=1`
takes it for every expert size, `=0` never. The FP8 layer's version, with the same switch and cut, is
`triton_decode_moe_fp8`.

When it wins (H100, the layer in a CUDA graph against the CUDA path in the same process, benchmarks/NOTES.md
"Session 19"): at T = 1 Qwen3-30B-A3B 37.2 vs 41.0 µs in bf16 and 24.2 vs 31.3 in FP8, OLMoE 46.3 vs 48.6 and
34.4 vs 35.8, and at T = 4-8 equal or better but for OLMoE FP8 at T = 4 (90.1 vs 85.3). Larger experts lose or
tie: Qwen3-235B-A22B (H·I = 4096·1536) FP8 76.8 vs 76.4 µs at T = 1 and 5% slower at T = 4-8, DeepSeek-V3
161 vs 135 µs, Mixtral 224 vs 137 µs (one program per slot and column block streams a large expert with too few
loads in flight). In the engine OLMoE's batch-1 decode step went 1.608 → 1.522 ms and its kernels 237 → 205.

Why: at T = 1 the CUDA path runs plan, GEMM1, GEMM2 and combine (four launches) for a layer whose only real cost
is streaming k experts' weights. On the H200 Qwen3-30B-A3B's layer took 36.9 µs in a graph against an ~18 µs byte
floor, the plan alone 5.8 µs and the combine 1.8-5 µs (benchmarks/NOTES.md, issue 21). With so few slots no
grouping by expert is worth having: each slot reads its own expert's rows directly (two slots on one expert read the
weight twice, the second time mostly from L2), so the plan goes, and the combine folds into the second launch.

- `_up`: programs (slot, BLOCK_I ∈ {4, 8, 16, 32} columns of the intermediate: `blocks_16bit`).
  h[slot, i] = act(x[t] · w13[e, i] + b_g, x[t] · w13[e, I + i] + b_u), e = topk_ids[slot], t = slot // k; float32
  sums, h stored in x's dtype (the CUDA kernel's intermediate precision). A slot whose id is outside [0, E) is
  skipped, as the CUDA kernel skips it.
- `_down`: programs (token, BLOCK_H ∈ {4, 8, 16} output columns), all k slots of the token in one
  [k, BLOCK_H, BLOCK_K] tile (k weight streams in flight at once).
  out[t, c] = Σ_s w[t, s] · (h[slot] · w2[e_s, c] + b2[e_s, c]) in float32, the slots reduced by a fixed tree
  (the same bits on every call, as the CUDA combine), one cast to x's dtype. The (token, column-block 0) program
  adds each valid slot to expert_load (an int64 atomic add: the counts are exact).

**One launch** (opt-in, `STATICMOE_DECODE_MOE_ONE_LAUNCH=1`, 16-bit; H100 session 20, before `blocks_16bit`: 34.6
vs 38.0 µs at Qwen3 T = 1 in isolation, engine steps 4.16 vs 4.22 ms for Qwen3 and 1.53 vs 1.53 for OLMoE):
`_one_launch` runs both as one grid, the `_up` programs first. A `_down` program loads its first weight step, then waits for its token's `_up` programs (a
per-token counter each of them increments with release semantics after a CTA barrier, read with acquire), then reads
h: the second launch's start and ramp go, and its first weights stream under the first launch's tail. Safe because
blocks are dispatched in program-id order (as decoupled look-back scans assume): a waiting `_down` program was
dispatched after every `_up` program, all of which run to completion without waiting. The last `_down` program of
a token puts its two counters back to zero, so one buffer serves every call and graph replay.

Both are weight streams: 2·I·H and H·I elements per slot, read in 32 KB steps per program with float32
multiply-adds (no tensor cores: one row per weight row). Grids at T = 1 on 132 SMs: Qwen3 (I = 768, H = 2048,
k = 8) 8 × 192 `_up` and 512 `_down` programs. Offline sm_90a compiles (Triton 3.9, 8 warps): `_up` 80-103
registers, `_down` 80-145 (8 bytes of stack at BLOCK_H 8 with biases, else none), 16-byte loads where H and I
are multiples of 16 (Triton specialises such sizes). CUDA-graph capturable (no host reads, buffers from the
caller's allocator; the one-launch counters are allocated by a first call, which must run outside capture, as the
engine's warm-up forward does).
"""

import functools

import torch

from model.kernels import pdl
from model.kernels.activation import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, Activation
from model.kernels.arrival_counters import arrival_counters
from model.kernels.fp8 import FP8_DTYPE
from model.kernels.knobs import env_switch
from model.kernels.triton_fp8_gemv import num_sms

try:
    import triton
    import triton.language as tl

    from model.kernels.pdl import wait_for_predecessor
except ImportError:  # CPU-only installs
    triton = tl = wait_for_predecessor = None

DECODE_MAX_SLOTS = 64  # T·k up to which the two-launch path runs
MAX_SPINS = 1 << 22  # the one-launch wait's bound: ~1 s of polling, far past any real wait (microseconds)
AUTO_MAX_EXPERT_ELEMENTS = 2048 * 1024  # H·I of the largest expert it is the default for: OLMoE's (measured faster)
DTYPES = (torch.bfloat16, torch.float16)
PROGRAMS_PER_SM = 4  # each launch's target: enough loads in flight (Triton does not pipeline these loops' loads)
UP_PROGRAMS_PER_SM = 16  # the 16-bit `_up`'s target: its H100 sweep ran fastest at 12-23 programs per SM
MIN_BLOCK_I = 4  # the 16-bit `_up`'s narrowest block (FP8's stays at 8: its per-block scales are 128 wide)
UP_TILE = 8192  # elements of `_up`'s [BLOCK_I, BLOCK_K] step per gate and up (32 KB of bf16 for both)
DOWN_TILE = 16384  # elements of `_down`'s [k_pad, BLOCK_H, BLOCK_K] step (32 KB of bf16)


def launch_blocks(T: int, k: int, H: int, inter: int, sms: int, min_block_h: int = 4,
                  up_per_sm: int = PROGRAMS_PER_SM, min_block_i: int = 8) -> tuple[int, int]:
    """(BLOCK_I of `_up`, BLOCK_H of `_down`): the widest blocks (32 and 16) that still give `_up` up_per_sm and
    `_down` PROGRAMS_PER_SM programs per SM, down to `min_block_i` and `min_block_h`. The first timing
    (benchmarks/NOTES.md) had 192 and 128 programs for Qwen3 at T = 1 and streamed at ~58% of the copy rate, against
    the floor at T = 8; the 16-bit layer passes UP_PROGRAMS_PER_SM and MIN_BLOCK_I (`blocks_16bit`)."""
    block_i = 32
    while block_i > min_block_i and T * k * -(-inter // block_i) < up_per_sm * sms:
        block_i //= 2
    block_h = 16
    while block_h > min_block_h and T * -(-H // block_h) < PROGRAMS_PER_SM * sms:
        block_h //= 2
    return block_i, block_h


def blocks_16bit(T: int, k: int, H: int, inter: int, sms: int) -> tuple[int, int]:
    """`launch_blocks` for the 16-bit layer. Its H100 sweep (benchmarks/NOTES.md "Session 20", graph µs, all
    (BLOCK_I, BLOCK_H, warps, tiles) timed) found `_up`'s block the lever and `_down`'s not: Qwen3-30B-A3B T = 1 ran
    38.0 µs at (8, 4) and 32.4-33.4 at BLOCK_I 4 with BLOCK_H 2 or 16; at T = 4, 119.2 at (32, 8) and 105.6 at (8, 8).
    More, narrower `_up` programs put more weight loads in flight (Triton does not pipeline these loops)."""
    return launch_blocks(T, k, H, inter, sms, up_per_sm=UP_PROGRAMS_PER_SM, min_block_i=MIN_BLOCK_I)

@functools.cache
def decode_moe_forced() -> bool | None:
    """`STATICMOE_DECODE_MOE` (read once per process): 1 takes the two launches at every expert size, 0 never,
    unset leaves it to the expert size (`wanted`)."""
    return env_switch("STATICMOE_DECODE_MOE", default=None)


@functools.cache
def one_launch_enabled() -> bool:
    """`STATICMOE_DECODE_MOE_ONE_LAUNCH=1` (read once per process): the 16-bit layer as one launch (module
    docstring), opt-in until a GPU run has checked and timed it."""
    return env_switch("STATICMOE_DECODE_MOE_ONE_LAUNCH")


def one_launch_counters(device: torch.device) -> torch.Tensor:
    """The one-launch kernel's int32 counters, two per token (model/kernels/arrival_counters.py), zero between calls."""
    return arrival_counters("one-launch decode MoE", device, 2 * DECODE_MAX_SLOTS)


def wanted(w13: torch.Tensor) -> bool:
    """The switch if set, else whether w13 [E, 2I, H]'s experts are small enough to gain (the module docstring)."""
    forced = decode_moe_forced()
    if forced is not None:
        return forced
    return (w13.shape[1] // 2) * w13.shape[2] <= AUTO_MAX_EXPERT_ELEMENTS


def available() -> bool:
    return triton is not None


def applies(x: torch.Tensor, w13: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    """Whether `fused_moe` takes the two-launch path for x [T, H] on a GPU: `wanted` for these experts, Triton
    present, T·k <= DECODE_MAX_SLOTS, and a 16-bit x with w13 of its dtype (this module) or a bf16 x with e4m3 w13
    (`triton_decode_moe_fp8`)."""
    dtypes_ok = (w13.dtype == x.dtype and x.dtype in DTYPES) or (w13.dtype == FP8_DTYPE and x.dtype == torch.bfloat16)
    return x.is_cuda and dtypes_ok and topk_ids.numel() <= DECODE_MAX_SLOTS and wanted(w13) and available()


if tl is not None:
    _MAX_SPINS = tl.constexpr(MAX_SPINS)

    @triton.jit
    def _activate(gate, up, SWIGLU_OAI: tl.constexpr, alpha: tl.constexpr, limit: tl.constexpr):
        if SWIGLU_OAI:  # gpt-oss: clamp, then (up + 1) · gate · sigmoid(α · gate)
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            return (up + 1.0) * gate / (1.0 + tl.exp(-alpha * gate))
        return gate / (1.0 + tl.exp(-gate)) * up

    @triton.jit
    def _up_tile(slot, i0, x_ptr, w13_ptr, b13_ptr, ids_ptr, h_ptr, E, H, I, K_SLOTS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SWIGLU_OAI: tl.constexpr, alpha: tl.constexpr, limit: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[slot, i0 : i0 + BLOCK_I] (nothing for a slot whose id is outside [0, E))."""
        e = tl.load(ids_ptr + slot).to(tl.int64)
        if (e >= 0) & (e < E):
            t = slot // K_SLOTS
            cols = i0 + tl.arange(0, BLOCK_I)  # [BLOCK_I]
            col_ok = cols < I
            ks = tl.arange(0, BLOCK_K)
            gate_rows = w13_ptr + e * 2 * I * H + cols[:, None].to(tl.int64) * H  # [BLOCK_I, 1]
            up_rows = gate_rows + I * H
            acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                k_ok = k0 + ks < H
                xv = tl.load(x_ptr + t * H + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
                mask = col_ok[:, None] & k_ok[None, :]
                wg = tl.load(gate_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_I, BLOCK_K]
                wu = tl.load(up_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32)
                acc_g += tl.sum(wg * xv[None, :], axis=1)
                acc_u += tl.sum(wu * xv[None, :], axis=1)
            if HAS_BIAS:
                acc_g += tl.load(b13_ptr + e * 2 * I + cols, mask=col_ok, other=0.0).to(tl.float32)
                acc_u += tl.load(b13_ptr + e * 2 * I + I + cols, mask=col_ok, other=0.0).to(tl.float32)
            h = _activate(acc_g, acc_u, SWIGLU_OAI, alpha, limit)
            tl.store(h_ptr + slot * I + cols, h.to(h_ptr.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _down_tile(t, c0, h_ptr, w2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr, load_ptr, ready_ptr, ready_target, E, H,
                   I, K_SLOTS: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr,
                   WAIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[t, c0 : c0 + BLOCK_H]. The first step's weights are loaded before h is read: under WAIT (one launch)
        that load is in flight while the program waits for token t's `_up_tile`s (ready_ptr[t] = ready_target)."""
        slots = tl.arange(0, K_PAD)  # all k slots of the token in one tile: k weight streams in flight at once
        e = tl.load(ids_ptr + t * K_SLOTS + slots, mask=slots < K_SLOTS, other=-1).to(tl.int64)  # [K_PAD]
        valid = (slots < K_SLOTS) & (e >= 0) & (e < E)
        e = tl.where(valid, e, 0)
        cols = c0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        col_ok = cols < H
        ks = tl.arange(0, BLOCK_K)
        rows = w2_ptr + e[:, None, None] * H * I + cols[None, :, None].to(tl.int64) * I  # [K_PAD, BLOCK_H, 1]
        h_rows = h_ptr + (t * K_SLOTS + slots[:, None]).to(tl.int64) * I  # [K_PAD, 1]
        k_ok = ks < I
        w = tl.load(rows + ks[None, None, :], mask=valid[:, None, None] & col_ok[None, :, None] & k_ok[None, None, :],
                    other=0.0)  # [K_PAD, BLOCK_H, BLOCK_K]: step 0
        if WAIT:  # ready_ptr[t] counts token t's finished `_up_tile`s (released by each after its h stores)
            arrived = tl.atomic_add(ready_ptr + t, 0, sem="acquire", scope="gpu")
            spins = 0
            while (arrived < ready_target) & (spins < _MAX_SPINS):  # bounded: a broken invariant gives wrong
                arrived = tl.atomic_add(ready_ptr + t, 0, sem="acquire", scope="gpu")  # numbers (which the
                spins += 1  # tests catch), never a hung GPU
        hv = tl.load(h_rows + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        acc = tl.sum(w.to(tl.float32) * hv.to(tl.float32)[:, None, :], axis=2)  # [K_PAD, BLOCK_H]
        for k0 in range(BLOCK_K, I, BLOCK_K):
            k_ok = k0 + ks < I
            hv = tl.load(h_rows + k0 + ks[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0,
                         cache_modifier=".cg")  # [K_PAD, BLOCK_K]
            mask = valid[:, None, None] & col_ok[None, :, None] & k_ok[None, None, :]
            w = tl.load(rows + k0 + ks[None, None, :], mask=mask, other=0.0)  # [K_PAD, BLOCK_H, BLOCK_K]
            acc += tl.sum(w.to(tl.float32) * hv.to(tl.float32)[:, None, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(b2_ptr + e[:, None] * H + cols[None, :], mask=valid[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
        wts = tl.load(wts_ptr + t * K_SLOTS + slots, mask=valid, other=0.0)  # [K_PAD] float32
        out = tl.sum(acc * wts[:, None], axis=0)  # [BLOCK_H]: a fixed reduction tree over the slots
        tl.store(out_ptr + t * H + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
        if COUNT:
            if c0 == 0:
                tl.atomic_add(load_ptr + e, tl.full([K_PAD], 1, tl.int64), mask=valid)

    @triton.jit
    def _up(x_ptr, w13_ptr, b13_ptr, ids_ptr, h_ptr, E, H, I, K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
            SWIGLU_OAI: tl.constexpr, alpha: tl.constexpr, limit: tl.constexpr, BLOCK_I: tl.constexpr,
            BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        _up_tile(tl.program_id(0), tl.program_id(1) * BLOCK_I, x_ptr, w13_ptr, b13_ptr, ids_ptr, h_ptr, E, H, I,
                 K_SLOTS, HAS_BIAS, SWIGLU_OAI, alpha, limit, BLOCK_I, BLOCK_K)

    @triton.jit
    def _down(h_ptr, w2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr, load_ptr, E, H, I, K_SLOTS: tl.constexpr,
              K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, COUNT: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        _down_tile(tl.program_id(0), tl.program_id(1) * BLOCK_H, h_ptr, w2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr,
                   load_ptr, load_ptr, 0, E, H, I, K_SLOTS, K_PAD, HAS_BIAS, COUNT, False, BLOCK_H, BLOCK_K)

    @triton.jit
    def _one_launch(x_ptr, w13_ptr, b13_ptr, h_ptr, w2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr, load_ptr, count_ptr,
                    T, E, H, I, K_SLOTS: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                    COUNT: tl.constexpr, SWIGLU_OAI: tl.constexpr, alpha: tl.constexpr, limit: tl.constexpr,
                    BLOCK_I: tl.constexpr, UP_BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOWN_BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Programs [0, T·k·i_blocks) are `_up`'s, the rest `_down`'s (module docstring, "One launch").
        count_ptr: [2T] int32, zero between calls: token t's finished up tiles, then its finished down tiles."""
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        pid = tl.program_id(0)
        i_blocks = tl.cdiv(I, BLOCK_I)
        num_up = T * K_SLOTS * i_blocks
        if pid < num_up:
            slot = pid // i_blocks
            _up_tile(slot, (pid % i_blocks) * BLOCK_I, x_ptr, w13_ptr, b13_ptr, ids_ptr, h_ptr, E, H, I, K_SLOTS,
                     HAS_BIAS, SWIGLU_OAI, alpha, limit, BLOCK_I, UP_BLOCK_K)
            tl.debug_barrier()  # every thread's h stores precede the release below
            tl.atomic_add(count_ptr + slot // K_SLOTS, 1, sem="release", scope="gpu")
        else:
            h_blocks = tl.cdiv(H, BLOCK_H)
            t = (pid - num_up) // h_blocks
            _down_tile(t, ((pid - num_up) % h_blocks) * BLOCK_H, h_ptr, w2_ptr, b2_ptr, ids_ptr, wts_ptr, out_ptr,
                       load_ptr, count_ptr, K_SLOTS * i_blocks, E, H, I, K_SLOTS, K_PAD, HAS_BIAS, COUNT, True,
                       BLOCK_H, DOWN_BLOCK_K)
            tl.debug_barrier()  # every thread's reads of h precede the reset below
            done = tl.atomic_add(count_ptr + T + t, 1, sem="acq_rel", scope="gpu")
            if done == h_blocks - 1:  # token t's last down tile: its counters back to zero for the next call
                tl.atomic_xchg(count_ptr + t, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(count_ptr + T + t, 0, sem="relaxed", scope="gpu")


def decode_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, expert_load: torch.Tensor | None, activation: Activation,
               w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
               blocks: tuple[int, int] | None = None, num_warps: int = 8,
               tiles: tuple[int, int] = (UP_TILE, DOWN_TILE), one_launch: bool | None = None) -> torch.Tensor:
    """`fused_moe` for x [T, H] with T·k <= DECODE_MAX_SLOTS (inputs already checked by `check_moe_inputs`).
    `blocks` (BLOCK_I, BLOCK_H) overrides `blocks_16bit`, `num_warps` the launches' warps and `tiles` their
    elements per loop step; `one_launch` the `STATICMOE_DECODE_MOE_ONE_LAUNCH` switch (tests, the benchmarks)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter, k = two_i // 2, topk_ids.shape[1]
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    ids = topk_ids.contiguous()
    wts = topk_weights.contiguous()
    h = torch.empty(T * k, inter, dtype=x.dtype, device=x.device)  # [T·k, I]
    out = torch.empty_like(x)  # [T, H]
    b13 = w13_bias.contiguous() if w13_bias is not None else x  # a placeholder pointer when there is no bias
    b2 = w2_bias.contiguous() if w2_bias is not None else x
    block_i, block_h = blocks or blocks_16bit(T, k, H, inter, num_sms(x.device))
    k_pad = triton.next_power_of_2(k)
    load = expert_load if expert_load is not None else ids  # a placeholder pointer when nothing is counted
    swiglu_oai = activation == Activation.SWIGLU_OAI
    if one_launch if one_launch is not None else one_launch_enabled():
        up_programs, down_programs = T * k * triton.cdiv(inter, block_i), T * triton.cdiv(H, block_h)
        _one_launch[(up_programs + down_programs,)](
            x, w13, b13, h, w2, b2, ids, wts, out, load, one_launch_counters(x.device), T, E, H, inter, K_SLOTS=k,
            K_PAD=k_pad, HAS_BIAS=w13_bias is not None, COUNT=expert_load is not None, SWIGLU_OAI=swiglu_oai,
            alpha=SWIGLU_OAI_ALPHA, limit=SWIGLU_OAI_LIMIT, BLOCK_I=block_i, UP_BLOCK_K=tiles[0] // block_i,
            BLOCK_H=block_h, DOWN_BLOCK_K=tiles[1] // (k_pad * block_h), num_warps=num_warps,
            **pdl.launch(x.is_cuda))
        return out
    _up[(T * k, triton.cdiv(inter, block_i))](
        x, w13, b13, ids, h, E, H, inter, K_SLOTS=k, HAS_BIAS=w13_bias is not None, SWIGLU_OAI=swiglu_oai,
        alpha=SWIGLU_OAI_ALPHA, limit=SWIGLU_OAI_LIMIT, BLOCK_I=block_i, BLOCK_K=tiles[0] // block_i,
        num_warps=num_warps, **pdl.launch(x.is_cuda))
    _down[(T, triton.cdiv(H, block_h))](
        h, w2, b2, ids, wts, out, load, E, H, inter, K_SLOTS=k, K_PAD=k_pad, HAS_BIAS=w2_bias is not None,
        COUNT=expert_load is not None, BLOCK_H=block_h, BLOCK_K=tiles[1] // (k_pad * block_h), num_warps=num_warps,
        **pdl.launch(x.is_cuda))
    return out
