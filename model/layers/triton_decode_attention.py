"""Paged decode attention as one Triton kernel: reads each sequence's keys and values straight from the cache blocks.

The SDPA path first gathers every sequence's (padded) block table into a dense K/V copy, which at large batches
moves several times the bytes of the KV cache itself; this kernel reads only the keys each query sees, once.
One program per (sequence, KV head, split of the keys) holds the query heads of that group as the rows of a small
matrix (padded to 16 for `tl.dot`) and loops over its keys in chunks of `BLOCK_N` with an online softmax. With one
split it writes [G, D] directly; small batches split the keys so the GPU fills, and a second kernel combines the
splits' (max, sum, accumulator) triples. Learned sinks (gpt-oss) are a key with score `sink` and no value: split 0
starts its rows' online softmax from (max = sink, sum = 1), so the combine needs nothing more.

Used on CUDA when Triton is importable (`model.layers.paged_attention` falls back to SDPA otherwise, or if the
kernel fails to build); with `TRITON_INTERPRET=1` it also runs on the CPU, where the tests run it when Triton
is installed (CI installs no Triton, so there only the GPU runs check it).
"""

import functools

import torch

from model.kernels import pdl
from model.layers.triton_paged import triton, tl

if triton is not None:
    from model.kernels.pdl import wait_for_predecessor
    from model.layers.triton_paged import dot, load_kv_tile, online_softmax_step

    # Integer arguments are not specialized (Triton would otherwise compile a variant per divisibility by 16 of,
    # e.g., the block-table width): eager mixed steps see many widths, and each new variant cost ~1 s at the
    # first burst of a server (scripts/probe_first_use.py).
    @triton.jit(do_not_specialize=["window", "table_stride", "max_keys", "split_len"])
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, sinks_ptr,
        scale, window, table_stride, max_keys, split_len,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
        SPLITS: tl.constexpr, HAS_SINKS: tl.constexpr, PDL: tl.constexpr,
    ):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), max_keys)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        q_rows = seq.to(tl.int64) * (NUM_KV_HEADS * GROUP) + kv_head * GROUP + offs_g  # this KV head's query heads
        real_rows = (offs_g < GROUP)[:, None]
        q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=real_rows, other=0.0)

        # This program's keys: [lo, hi) = the visible keys (window) within its split.
        lo = split * split_len
        if USE_WINDOW:
            lo = tl.maximum(lo, context_len - window)
        hi = tl.minimum(context_len, (split + 1) * split_len)
        first = (lo // BLOCK_N) * BLOCK_N
        end = tl.where(lo < hi, hi, first)  # nothing visible: an empty loop, not a chunk of -inf scores
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        if HAS_SINKS:  # the sink joins once, in split 0: (max, sum) = (sink, exp(sink - sink))
            with_sink = (offs_g < GROUP) & (split == 0)
            sink = tl.load(sinks_ptr + kv_head * GROUP + offs_g, mask=offs_g < GROUP, other=0.0).to(tl.float32)
            m_i = tl.where(with_sink, sink, m_i)
            l_i = tl.where(with_sink, 1.0, l_i)
        for key0 in range(first, end, BLOCK_N):
            pos = key0 + offs_n  # [BLOCK_N] key positions
            visible = (pos >= lo) & (pos < hi)
            k, v = load_kv_tile(k_ptr, v_ptr, tables_ptr, seq, table_stride, pos, visible, kv_head,
                                NUM_KV_HEADS, HEAD_DIM, PAGE)  # [BLOCK_N, D] each
            scores = dot(q, tl.trans(k), IEEE)
            scores = tl.where(visible[None, :], scores * scale, float("-inf"))  # [G, BLOCK_N]
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, v, IEEE)
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding row (no keys) yields zeros, not NaN
            tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=real_rows)
        else:  # partial results [B * Hq, SPLITS(, D)], combined by _combine_splits_kernel
            part = q_rows * SPLITS + split
            tl.store(part_max_ptr + part, m_i, mask=offs_g < GROUP)
            tl.store(part_sum_ptr + part, l_i, mask=offs_g < GROUP)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=real_rows)

    @triton.jit
    def _combine_splits_kernel(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr,
                               SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                               PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        real = offs_s < SPLITS
        m = tl.load(part_max_ptr + row * SPLITS + offs_s, mask=real, other=float("-inf"))  # [S]
        total_max = tl.max(m, 0)
        weight = tl.where(m > float("-inf"), tl.exp(m - total_max), 0.0)  # splits that saw no key weigh 0
        denom = tl.sum(weight * tl.load(part_sum_ptr + row * SPLITS + offs_s, mask=real, other=0.0), 0)
        acc = tl.load(part_acc_ptr + (row * SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=real[:, None], other=0.0)  # [S, D]
        out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


def num_sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_partials(rows: int, splits: int, width: int, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(max, sum, acc) buffers [rows, splits(, width)] fp32 where the splits of a split-K decode leave their partial
    softmax state for `combine_splits`; with one split the kernel writes `out` directly (they are unused)."""
    if splits == 1:
        return out, out, out
    part_max = torch.empty(rows, splits, dtype=torch.float32, device=out.device)
    return part_max, torch.empty_like(part_max), torch.empty(rows, splits, width, dtype=torch.float32,
                                                             device=out.device)


def combine_splits(partials: tuple[torch.Tensor, ...], out: torch.Tensor, rows: int, splits: int, width: int) -> None:
    """Merges the splits' (max, sum, acc) of each of `rows` rows into out [rows, width] (nothing with one split)."""
    if splits > 1:
        _combine_splits_kernel[(rows,)](*partials, out, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
                                        HEAD_DIM=width, **pdl.launch(out.is_cuda))


def choose_splits(num_seqs: int, num_kv_heads: int, max_keys: int, device: torch.device, block_n: int) -> int:
    """Split each sequence's keys over several programs when (sequence, KV head) pairs alone cannot fill the GPU
    (small batches): about four programs per SM (rounded down to a power of two), each with at least one chunk of
    keys; keys of at most two chunks are not split (the combine's launch costs more than it saves).
    Depends only on shapes, so a captured CUDA graph keeps it.

    Four per SM: on the H200 (benchmarks/bench_decode_attention.py, 2026-12-07) this picks the fastest measured split
    count, or one within 9%, at every olmoe / qwen3 / gpt-oss point of batch 1, 4, 64 and context 128-8192, where two
    per SM (the rule before) took 15-37% longer at batch 4 and long contexts (gpt-oss B=4 ctx 8192: 36.6 µs with 8
    splits, 26.8 with 16) and two splits of a 128-key context up to 35% longer than one (qwen3 B=64)."""
    chunks = -(-max_keys // block_n)
    if device.type != "cuda" or chunks <= 2:
        return 1
    return power_of_two_splits(4 * num_sms(device) // (num_seqs * num_kv_heads), chunks)


def power_of_two_splits(wanted: int, chunks: int) -> int:
    """`wanted` splits, at most one per chunk of keys and 64, rounded down to a power of two (SPLITS is a
    compile-time constant of the kernels: few variants)."""
    splits = max(1, min(wanted, chunks, 64))
    return 1 << (splits.bit_length() - 1)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    sliding_window: int | None,
    splits: int | None = None,  # None: choose_splits
    sinks: torch.Tensor | None = None,  # [Hq] learned sink logits
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    q = q.contiguous()
    out = torch.empty_like(q)
    block_n = 64 if head_dim <= 128 else 32
    max_keys = block_tables.shape[1] * page
    splits = splits or choose_splits(num_seqs, num_kv_heads, max_keys, q.device, block_n)
    split_len = -(-max_keys // (splits * block_n)) * block_n  # a whole number of key chunks
    partials = split_partials(num_seqs * num_heads, splits, head_dim, out)
    _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, *partials,
        q if sinks is None else sinks.contiguous(), scale, sliding_window or 0, block_tables.stride(0), max_keys, split_len,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32, SPLITS=splits, HAS_SINKS=sinks is not None, num_warps=4,
        **pdl.launch(q.is_cuda),
    )
    combine_splits(partials, out, num_seqs * num_heads, splits, head_dim)
    return out
