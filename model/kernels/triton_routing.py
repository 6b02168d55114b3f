"""The plain routers (`softmax_topk`, `topk_softmax` of `model.kernels.routing`) as ONE Triton kernel each call.

Why: torch routes a decode token with up to seven kernels (cast to float32, softmax, the two of `torch.topk`
(gatherTopK + a bitonic sort), sum and divide to renormalise, cast of the ids to int32): about 10 µs per MoE layer on
the H100 at batch 1 (issue 21), 16 layers per step for OLMoE and 48 for Qwen3-30B-A3B. Here one program reads a few
whole rows of logits and writes the k weights and ids.

Per row: the logits (any float dtype, any strides) are loaded into a power-of-two tile padded with -inf, promoted to
float32, optionally softmaxed over all experts (on the GPU with libdevice's exp, the accurate expf that torch's
softmax calls, not `tl.exp`'s ex2.approx, so the weights stay within the tests' 1e-6 relative of torch's), and the
top-k are taken by k rounds of max, then the lowest index holding that max (ties go to the lower expert, as
`grouped_topk`'s stable sort does), then masking it out. The k results come out in descending order, like
`torch.topk(sorted=True)`. `topk_softmax` ranks the logits and softmaxes the k chosen ones only (gpt-oss).

No host sync and no data-dependent shapes, so a decode step that routes stays CUDA-graph capturable. Launch shapes
(rows per program, warps) depend on the row count and E only.
"""

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs
    triton = tl = libdevice = None

MAX_EXPERTS = 512  # one row must fit a program's registers
MAX_TOP_K = 32


def available() -> bool:
    return triton is not None


def supports(num_experts: int, top_k: int) -> bool:
    """Whether the kernel takes this routing (the torch reference takes the rest)."""
    return num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K


def launch_config(num_tokens: int, num_experts: int) -> tuple[int, int, int]:
    """(padded experts, rows per program, warps): a tile of about 2048 logits per program, at most twice the rows
    the call has (a decode step of one token runs one program; two rows at least, as no tile dimension is 1)."""
    e_pad = triton.next_power_of_2(num_experts)
    rows = max(2, min(16, 2048 // e_pad, triton.next_power_of_2(num_tokens)))
    warps = 1 if rows * e_pad <= 256 else (2 if rows * e_pad <= 512 else 4)
    return e_pad, rows, warps


if triton is not None:

    @triton.jit
    def _exp(x, ACCURATE: tl.constexpr):
        """CUDA's accurate expf (libdevice), which torch's softmax calls; `tl.exp` where ACCURATE is off: Triton's
        CPU interpreter has no libdevice."""
        if ACCURATE:
            y = libdevice.exp(x)
        else:
            y = tl.exp(x)
        return y

    @triton.jit
    def _divide_rows(x, row_totals):
        """x [R, n] / row_totals [R], rounded to nearest as torch divides (not Triton's approximate division)."""
        return tl.div_rn(x, tl.broadcast_to(row_totals[:, None], x.shape))

    @triton.jit
    def route_scores(scores, in_row, experts, num_experts, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                     ROWS: tl.constexpr, E_PAD: tl.constexpr, SOFTMAX_ALL: tl.constexpr, RENORMALIZE: tl.constexpr,
                     ACCURATE_EXP: tl.constexpr):
        """scores [R, E_PAD] float32 logits (-inf where not in_row [1, E_PAD]) -> (weights [R, K_PAD] float32,
        ids [R, K_PAD] int32), the first TOP_K slots meaningful. Shared with `triton_router_gemv`, whose last program
        routes the logits it has just computed."""
        if SOFTMAX_ALL:
            exps = _exp(scores - tl.max(scores, 1)[:, None], ACCURATE_EXP)  # 0 in the padding
            scores = _divide_rows(exps, tl.sum(exps, 1))  # the probabilities, as torch.softmax divides
            scores = tl.where(in_row, scores, float("-inf"))  # a padded column never ties an underflowed 0

        slots = tl.arange(0, K_PAD)  # [K_PAD]
        top_vals = tl.zeros((ROWS, K_PAD), dtype=tl.float32)
        top_ids = tl.zeros((ROWS, K_PAD), dtype=tl.int32)
        for slot in tl.static_range(TOP_K):
            best = tl.max(scores, 1)  # [R]
            best_id = tl.min(tl.where(scores == best[:, None], experts[None, :], E_PAD), 1)  # the lowest tied
            best_id = tl.minimum(best_id, num_experts - 1)  # a NaN row matches nothing: keep the id in range
            top_vals = tl.where(slots[None, :] == slot, best[:, None], top_vals)
            top_ids = tl.where(slots[None, :] == slot, best_id[:, None], top_ids)
            scores = tl.where(experts[None, :] == best_id[:, None], float("-inf"), scores)

        chosen = slots[None, :] < TOP_K  # [1, K_PAD]
        if SOFTMAX_ALL:
            if RENORMALIZE:
                top_vals = _divide_rows(top_vals, tl.sum(tl.where(chosen, top_vals, 0.0), 1))
        else:  # softmax over the k chosen logits; the first is their max
            first = tl.max(tl.where(chosen, top_vals, float("-inf")), 1)  # [R]
            exps = tl.where(chosen, _exp(top_vals - first[:, None], ACCURATE_EXP), 0.0)
            top_vals = _divide_rows(exps, tl.sum(exps, 1))

        return top_vals, top_ids

    # num_tokens changes every step: unspecialised, so that a step whose row count is not a multiple of 16 finds
    # the variant (ROWS, warps: launch_config, by row count up to 16) start-up compiled instead of waiting for
    # another (benchmarks/NOTES.md, "Session 18")
    @triton.jit(do_not_specialize=["num_tokens"])
    def _route_rows(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t, stride_e,
                    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr,
                    SOFTMAX_ALL: tl.constexpr, RENORMALIZE: tl.constexpr, ACCURATE_EXP: tl.constexpr):
        """SOFTMAX_ALL: softmax over E, top-k of the probabilities (renormalised if RENORMALIZE). Else: top-k of the
        logits, softmax over the k chosen."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [R]
        row_ok = rows < num_tokens
        rows = tl.minimum(rows, num_tokens - 1)  # rows past the end compute the last row again, stored nowhere
        experts = tl.arange(0, E_PAD)  # [E_PAD]
        in_row = experts[None, :] < num_experts  # [1, E_PAD]
        ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + experts[None, :].to(tl.int64) * stride_e
        scores = tl.load(ptrs, mask=in_row, other=float("-inf")).to(tl.float32)  # [R, E_PAD]
        top_vals, top_ids = route_scores(scores, in_row, experts, num_experts, TOP_K, K_PAD, ROWS, E_PAD,
                                         SOFTMAX_ALL, RENORMALIZE, ACCURATE_EXP)  # [R, K_PAD] each
        slots = tl.arange(0, K_PAD)  # [K_PAD]
        chosen = slots[None, :] < TOP_K  # [1, K_PAD]
        out_offs = rows[:, None].to(tl.int64) * TOP_K + slots[None, :]  # [R, K_PAD] into row-major [T, k]
        out_ok = row_ok[:, None] & chosen
        tl.store(weights_ptr + out_offs, top_vals, mask=out_ok)
        tl.store(ids_ptr + out_offs, top_ids, mask=out_ok)


def route(router_logits: torch.Tensor, top_k: int, softmax_all: bool, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (bf16/fp16/fp32, any strides) -> (weights float32 [T, k], ids int32 [T, k]), one launch.
    softmax_all: `softmax_topk`'s routing, else `topk_softmax`'s. Callers check the shapes (`routing` does) and
    `supports(E, top_k)`."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    e_pad, rows, warps = launch_config(num_tokens, num_experts)
    _route_rows[(triton.cdiv(num_tokens, rows),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, K_PAD=max(2, triton.next_power_of_2(top_k)), E_PAD=e_pad, ROWS=rows,
        SOFTMAX_ALL=softmax_all, RENORMALIZE=renormalize, ACCURATE_EXP=router_logits.is_cuda,
        num_warps=warps)
    return weights, ids
