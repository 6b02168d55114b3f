"""Paged prefill attention as one Triton kernel: every prefill chunk of a step, read straight from the cache blocks.

The SDPA path runs each chunk alone: a gather of its K and V blocks, a copy per tensor to repeat KV heads, the
attention call and a scatter of the result, about ten kernels per chunk and layer. A step with a few 512-token
prompts launched ~900 kernels, and its host time (launching them) was 2-3x its GPU time
(`scripts/probe_prefill.py`, benchmarks/NOTES.md "Prefill steps"). Here one launch per layer covers all chunks:
one program per (tile of `BLOCK_M` new tokens of a chunk, query head) loops over the keys that tile can see, in
chunks of `BLOCK_N`, with an online softmax (FlashAttention-2's schedule). The queries of a chunk are the last
`num_new` positions of its sequence, so the causal mask is aligned to the bottom right, as chunked prefill needs. Learned sinks (gpt-oss) start each row's online softmax at (max = sink, sum = 1): a key
with score `sink` and no value.

Used on CUDA when Triton is importable (`model.layers.paged_attention` falls back to SDPA otherwise, or if the
kernel fails to build); with `TRITON_INTERPRET=1` it also runs on the CPU, where the tests run it when Triton
is installed (CI installs no Triton, so there only the GPU runs check it).
"""

import torch

from model.layers.triton_paged import triton, tl

if triton is not None:
    from model.layers.triton_paged import dot, load_kv_tile, online_softmax_step

    # Integer arguments vary from step to step; specializing on them would compile a variant per value class.
    @triton.jit(do_not_specialize=["window", "table_stride", "num_chunks"])
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, meta_ptr, tile_ptr, sinks_ptr,
        scale, window, table_stride, num_chunks,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        chunk = tl.load(tile_ptr + 2 * tile)  # tiles: (chunk, first new token of the tile)
        m0 = tl.load(tile_ptr + 2 * tile + 1)
        # meta rows (one column per chunk): first flat row, new tokens, context length, sequence (block-table row)
        row0 = tl.load(meta_ptr + chunk)
        num_new = tl.load(meta_ptr + num_chunks + chunk)
        context_len = tl.load(meta_ptr + 2 * num_chunks + chunk)
        seq = tl.load(meta_ptr + 3 * num_chunks + chunk)

        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        real = offs_m < num_new
        q_pos = context_len - num_new + offs_m  # [BLOCK_M] positions of these queries in the sequence
        rows = (row0 + offs_m).to(tl.int64)
        q_offs = rows[:, None] * (NUM_KV_HEADS * GROUP * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + q_offs, mask=real[:, None], other=0.0)

        last_pos = context_len - num_new + tl.minimum(m0 + BLOCK_M, num_new) - 1  # the tile's last query
        hi = last_pos + 1  # causal: no key beyond the tile's last query
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(0, context_len - num_new + m0 - window + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if HAS_SINKS:
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head).to(tl.float32)
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        for key0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            pos = key0 + offs_n  # [BLOCK_N] key positions
            in_range = (pos >= lo) & (pos < hi)
            k, v = load_kv_tile(k_ptr, v_ptr, tables_ptr, seq, table_stride, pos, in_range, kv_head,
                                NUM_KV_HEADS, HEAD_DIM, PAGE)  # [BLOCK_N, D] each
            scores = dot(q, tl.trans(k), IEEE)
            visible = in_range[None, :] & (pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible &= pos[None, :] > q_pos[:, None] - window
            scores = tl.where(visible, scores * scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, v, IEEE)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def block_m_for(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def chunk_tables(rows: list[int], num_new: list[int], context_lens: list[int], seqs: list[int], block_m: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-chunk metadata [4, C] and its tiles [n_tiles, 2] (chunk, first new token), from the host
    lengths the scheduler already knows; one host-to-device copy each."""
    meta = torch.tensor([rows, num_new, context_lens, seqs], dtype=torch.int32)
    tiles = torch.tensor([(c, m0) for c, n in enumerate(num_new) for m0 in range(0, n, block_m)],
                         dtype=torch.int32).view(-1, 2)
    return meta.to(device, non_blocking=True), tiles.to(device, non_blocking=True)


def paged_prefill_attention(
    q: torch.Tensor,  # [N, Hq, D] contiguous: the step's flat batch
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int, one row per sequence of the step
    meta: torch.Tensor,  # [4, C] int32 from chunk_tables
    tiles: torch.Tensor,  # [n_tiles, 2] int32 from chunk_tables
    out: torch.Tensor,  # [N, Hq, D]: the chunks' rows are written, other rows left as they are
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None = None,  # [Hq] learned sink logits
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton prefill kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if tiles.shape[0] == 0:
        return
    _paged_prefill_kernel[(tiles.shape[0], num_heads)](
        q, k_cache, v_cache, out, block_tables, meta, tiles, q if sinks is None else sinks.contiguous(),
        scale, sliding_window or 0, block_tables.stride(0), meta.shape[1],
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m_for(head_dim), BLOCK_N=64 if head_dim <= 128 else 32,
        USE_WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32, HAS_SINKS=sinks is not None,
        num_warps=4, num_stages=2,
    )
