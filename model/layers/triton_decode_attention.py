"""Paged decode attention as one Triton kernel: reads each sequence's keys and values straight from the cache blocks.

The SDPA path first gathers every sequence's (padded) block table into a dense K/V copy, which at large batches
moves several times the bytes of the KV cache itself; this kernel reads only the keys each query sees, once.
One program per (sequence, KV head) holds the query heads of that group as the rows of a small matrix (padded to
16 for `tl.dot`), loops over the keys in chunks of `BLOCK_N` with an online softmax, and writes [G, D].

Used on CUDA when Triton is importable (`model.layers.paged_attention` falls back to SDPA otherwise, or if the
kernel fails to build); with `TRITON_INTERPRET=1` it also runs on the CPU, which is how CI checks it.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
        scale, window, table_stride, max_keys,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        context_len = tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), max_keys)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * GROUP + offs_g  # query heads of this KV head
        q_rows = seq.to(tl.int64) * (NUM_KV_HEADS * GROUP) + heads
        q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=(offs_g < GROUP)[:, None], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        start = 0
        if USE_WINDOW:
            start = tl.maximum(context_len - window, 0)
        first = (start // BLOCK_N) * BLOCK_N
        for key0 in range(first, context_len, BLOCK_N):
            pos = key0 + offs_n  # [BLOCK_N] key positions
            visible = (pos < context_len) & (pos >= start)
            block = tl.load(tables_ptr + seq.to(tl.int64) * table_stride + pos // PAGE, mask=visible, other=0)
            slot = block.to(tl.int64) * PAGE + pos % PAGE
            kv_offs = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_ptr + kv_offs, mask=visible[:, None], other=0.0)  # [BLOCK_N, D]
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(visible[None, :], scores * scale, float("-inf"))  # [G, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_offs, mask=visible[:, None], other=0.0)  # [BLOCK_N, D]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding row (no keys) yields zeros, not NaN
        tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(offs_g < GROUP)[:, None])


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] contiguous
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    q = q.contiguous()
    out = torch.empty_like(q)
    block_n = 64 if head_dim <= 128 else 32
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        scale, sliding_window or 0, block_tables.stride(0), block_tables.shape[1] * page,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )
    return out
