"""The router's linear and its routing in ONE Triton launch for decode-sized batches (N <= FUSED_MAX_ROWS rows):
logits = x · Wᵀ (+ bias), then `softmax_topk`'s or `topk_softmax`'s routing, writing (weights float32 [N, k],
ids int32 [N, k]).

Why (issue 21): at batch 1 the router's linear is a latency-bound cuBLAS launch (5.0 µs on the H100 for OLMoE's
64 x 2048 bf16 weight, 256 KB) followed by the one-kernel router of `triton_routing` (2.5 µs); 16 MoE layers per
OLMoE step, 48 for Qwen3-30B-A3B (128 x 2048). One launch saves a launch and the logits' round trip per layer.

**Numerics: the unfused rule.** `self.gate(x)` accumulates in float32 and rounds once to the model dtype (cuBLAS adds
the bias to the float32 accumulator before that rounding, as its epilogue or its beta·C term does); the routing then
promotes to float32. Here: float32 accumulation, + bias in float32, one cast to x's dtype (round to nearest even),
back to float32, then the very routing code of `triton_routing` (`route_scores`: accurate expf, IEEE division, ties
to the lower expert). Only the summation order differs from cuBLAS's, so a logit may differ in its last ulp where the
float32 sums differ; on data whose float32 sums are exact (tests) the results are those of the unfused path.
Triton's interpreter rounds float downcasts half away from zero (see `triton_fp8_gemv`), so there (INTERPRETED) the
logits are first rounded onto the dtype's grid with float32 additions; its bf16/fp16 `tl.dot` multiplies the raw
bits, so there the tiles are promoted to float32 first (exact).

**Launch.** Programs: cdiv(E, BLOCK_E = 16) expert tiles × `splits` ranges of H (`plan`: about TARGET_PROGRAMS in all,
so the 256-512 KB weight streams through most SMs in 2-4 KB pieces rather than through one). Each computes its
[16, BLOCK_E] product (rows past N load zeros) and stores the real rows into a float32 scratch [splits, N, E], then
takes a ticket from one int32 counter (CTA barrier, atomic add acq_rel at GPU scope). The last to arrive loads the
whole scratch as one [S_PAD, R, E_PAD] tile (S_PAD × R × E_PAD <= REDUCE_BUDGET floats: all loads in flight at
once), sums it over the splits (a fixed reduction tree: independent of arrival order, so the same bits in give the
same routing on every call and every expert-parallel rank), routes the R >= N rows, stores
them, and puts the counter back to 0, so one zeroed counter per device serves every call and every CUDA-graph replay.
Warps (`launch_warps`): 1 at batch 1 (the routing's k rounds of row reductions then need no shared memory), more
where the routing tile or the reducer's load per thread grows.
The counter is allocated on the first call, which must run outside graph capture (the engine's warm-up forward);
calls sharing it must not run concurrently (the engine runs one stream).

**The cut (FUSED_MAX_ROWS = 16).** The product's tile has 16 rows (`tl.dot`'s least M), so up to 16 rows cost the
same weight stream as one; the reducer's scratch grows as splits × N × E and its budget cuts the splits (4 at N = 16,
E = 128: 32 programs of 16 KB), and the routing tile (R × E_PAD) grows with N. Beyond 16 rows the weight stream is
amortised, cuBLAS is no longer launch-bound, and the unfused path runs.
"""

import torch

from model.kernels import pdl, triton_routing
from model.kernels.arrival_counters import arrival_counters as shared_counters
from model.kernels.arrival_counters import triton_interpreted

try:
    import triton
    import triton.language as tl

    from model.kernels.pdl import wait_for_predecessor
    from model.kernels.triton_fp8_gemv import _round_to_precision  # the interpreter's exact downcast
    from model.kernels.triton_routing import route_scores
except ImportError:  # CPU-only installs
    triton = tl = _round_to_precision = route_scores = None

FUSED_MAX_ROWS = 16
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # of x and the router's weight (and bias)
BLOCK_E = 16  # experts per program (tl.dot's least N)
BLOCK_K = 64  # hidden units per step of a program's loop
TARGET_PROGRAMS = 128  # about one per SM of an H100 (132)
REDUCE_BUDGET = 8192  # floats the last program loads at once: S_PAD × R × E_PAD


def available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def route_rows(num_rows: int) -> int:
    """R: the routing tile's rows, a power of two >= 2 (as `triton_routing`: no tile dimension is 1)."""
    return max(2, _pow2(num_rows))


def supports(num_rows: int, num_experts: int, hidden: int, top_k: int) -> bool:
    return 1 <= num_rows <= FUSED_MAX_ROWS and hidden >= 1 and 1 <= top_k <= num_experts and \
        triton_routing.supports(num_experts, top_k)


def plan(num_rows: int, num_experts: int, hidden: int) -> tuple[int, int]:
    """(splits, K steps per split) for N rows, E experts, H hidden: splits of H so that tiles × splits reaches about
    TARGET_PROGRAMS, a power of two at most REDUCE_BUDGET / (R × E_PAD) (the reducer's one load), no split empty."""
    tiles = -(-num_experts // BLOCK_E)
    num_kb = -(-hidden // BLOCK_K)
    cap = max(1, REDUCE_BUDGET // (route_rows(num_rows) * _pow2(num_experts)))
    cap = 1 << (cap.bit_length() - 1)  # S_PAD = next power of two of splits must stay within the budget
    want = max(1, min(-(-TARGET_PROGRAMS // tiles), cap, num_kb))
    per_split = -(-num_kb // want)
    return -(-num_kb // per_split), per_split


def launch_warps(num_rows: int, num_experts: int, s_pad: int) -> int:
    """Warps per program: as few as the routing tile allows (`triton_routing.launch_config`'s rule: the top-k's
    k rounds of row reductions stay within a warp's shuffles at R × E_PAD <= 256), and enough that the reducer's one
    load is at most 128 floats per thread (no spills on sm_90 at 1 warp and S_PAD × R × E_PAD = 4096)."""
    tile = route_rows(num_rows) * _pow2(num_experts)
    by_tile = 1 if tile <= 256 else 2 if tile <= 512 else 4 if tile <= 2048 else 8
    by_reducer = _pow2(-(-s_pad * tile // (128 * 32)))
    return min(8, max(by_tile, by_reducer))


def arrival_counter(device: torch.device) -> torch.Tensor:
    """The device's int32 counter [1] (model/kernels/arrival_counters.py), zero between calls."""
    return shared_counters("fused router", device, 1)


if triton is not None:

    @triton.jit
    def _router_gemv_route(x_ptr, w_ptr, bias_ptr, part_ptr, count_ptr, weights_ptr, ids_ptr, N, E, H,
                           k_per_split, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, IEEE_DOT: tl.constexpr,
                           TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, R: tl.constexpr,
                           S_PAD: tl.constexpr, SOFTMAX_ALL: tl.constexpr, RENORMALIZE: tl.constexpr,
                           ACCURATE_EXP: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        pid_e, pid_s = tl.program_id(0), tl.program_id(1)
        num_splits = tl.num_programs(1)
        rows = tl.arange(0, 16)  # [16] the product's rows; N <= 16
        cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE] experts
        ks = pid_s * k_per_split + tl.arange(0, BLOCK_K)  # [BK]
        k_end = tl.minimum(pid_s * k_per_split + k_per_split, H)
        row_ok, col_ok = rows < N, cols < E
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * H + ks[None, :]  # [16, BK]
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * H + ks[:, None]  # [BK, BE]: Wᵀ's tile
        acc = tl.zeros((16, BLOCK_E), dtype=tl.float32)
        for k0 in range(pid_s * k_per_split, k_end, BLOCK_K):
            k_ok = (ks + (k0 - pid_s * k_per_split)) < k_end  # [BK]
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE_DOT or INTERPRETED:  # float32: no TF32. The interpreter's bf16/fp16 dot is wrong; exact in fp32
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        mine = part_ptr + pid_s.to(tl.int64) * N * E  # [splits, N, E]: this split's [N, E]
        tl.store(mine + rows[:, None] * E + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits * tl.num_programs(0) - 1:  # the last program: all partials visible (acquire)
            splits = tl.arange(0, S_PAD)[:, None, None]  # [S, 1, 1]
            r = tl.arange(0, R)  # [R]
            experts = tl.arange(0, E_PAD)  # [E_PAD]
            in_row = experts[None, :] < E  # [1, E_PAD]
            offs = splits * N * E + r[None, :, None] * E + experts[None, None, :]  # [S, R, E_PAD]
            ok = (splits < num_splits) & (r[None, :, None] < N) & (experts[None, None, :] < E)
            parts = tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
            logits = tl.sum(parts, 0)  # [R, E_PAD] float32
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")  # zero for the next call
            if HAS_BIAS:
                logits += tl.load(bias_ptr + experts, mask=experts < E, other=0.0).to(tl.float32)[None, :]
            if INTERPRETED:  # its downcast is not round-to-nearest-even (module docstring)
                if x_ptr.dtype.element_ty == tl.bfloat16:
                    logits = _round_to_precision(logits, 7, -126)
                elif x_ptr.dtype.element_ty == tl.float16:
                    logits = _round_to_precision(logits, 10, -14)
            logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)  # as the linear's output, then promoted
            scores = tl.where(in_row, logits, float("-inf"))
            top_vals, top_ids = route_scores(scores, in_row, experts, E, TOP_K, K_PAD, R, E_PAD, SOFTMAX_ALL,
                                             RENORMALIZE, ACCURATE_EXP)  # [R, K_PAD] each
            slots = tl.arange(0, K_PAD)  # [K_PAD]
            out_offs = r[:, None] * TOP_K + slots[None, :]  # [R, K_PAD] into row-major [N, k]
            out_ok = (r[:, None] < N) & (slots[None, :] < TOP_K)
            tl.store(weights_ptr + out_offs, top_vals, mask=out_ok)
            tl.store(ids_ptr + out_offs, top_ids, mask=out_ok)


def fused_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, softmax_all: bool,
                renormalize: bool, *, splits: int | None = None, warps: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] (N <= FUSED_MAX_ROWS), weight [E, H] of x's dtype, bias [E] or None -> (weights float32 [N, k],
    ids int32 [N, k]) of `softmax_topk` (softmax_all) or `topk_softmax` on x · Wᵀ + bias rounded to x's dtype.
    `splits` / `warps` override `plan` / `launch_warps` (tests, benchmark sweeps). Callers check `supports`
    (`routing` does)."""
    num_rows, hidden = x.shape
    num_experts = weight.shape[0]
    if not supports(num_rows, num_experts, hidden, top_k) or weight.shape[1] != hidden or \
            weight.dtype != x.dtype or x.dtype not in DTYPES:
        raise ValueError(f"the fused router takes x [1..{FUSED_MAX_ROWS}, H] bf16/fp16/fp32, weight [E, H] of "
                         f"x's dtype and top_k <= E; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, top_k={top_k}")
    x, weight = x.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    num_splits, per_split = plan(num_rows, num_experts, hidden)
    if splits is not None:
        num_kb = -(-hidden // BLOCK_K)
        per_split = -(-num_kb // splits)
        num_splits = -(-num_kb // per_split)
    rows, e_pad, s_pad = route_rows(num_rows), _pow2(num_experts), _pow2(num_splits)
    if s_pad * rows * e_pad > max(REDUCE_BUDGET, rows * e_pad):
        raise ValueError(f"{num_splits} splits exceed the reducer's budget of {REDUCE_BUDGET} floats")
    weights = torch.empty(num_rows, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_rows, top_k, dtype=torch.int32, device=x.device)
    partials = torch.empty(num_splits, num_rows, num_experts, dtype=torch.float32, device=x.device)
    _router_gemv_route[(triton.cdiv(num_experts, BLOCK_E), num_splits)](
        x, weight, bias if bias is not None else weight, partials, arrival_counter(x.device), weights, ids,
        num_rows, num_experts, hidden, per_split * BLOCK_K, HAS_BIAS=bias is not None, INTERPRETED=triton_interpreted(),
        IEEE_DOT=x.dtype == torch.float32, TOP_K=top_k, K_PAD=max(2, _pow2(top_k)), E_PAD=e_pad, R=rows,
        S_PAD=s_pad, SOFTMAX_ALL=softmax_all, RENORMALIZE=renormalize, ACCURATE_EXP=x.is_cuda, BLOCK_E=BLOCK_E,
        BLOCK_K=BLOCK_K, num_warps=warps or launch_warps(num_rows, num_experts, s_pad), **pdl.launch(x.is_cuda))
    return weights, ids
