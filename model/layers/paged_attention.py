"""Attention over a paged KV cache in pure torch (SDPA), on CPU and GPU.

A layer's cache is [2, num_blocks, block_size, Hkv, D]. `AttentionPlan` holds the index tensors every layer of one
step shares. Two paths:
- decode rows (one new token per sequence): gathered into one batched SDPA call with fixed shapes, no host sync,
  so a decode step is CUDA-graph capturable;
- prefill chunks: one SDPA call per sequence, bounded by host-side lengths the scheduler already knows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.forward_batch import ForwardBatch


@dataclass
class PrefillChunk:
    seq: int  # index into block_tables
    row_start: int  # first row of its new tokens in the flat batch
    num_new: int
    context_len: int  # cached + new


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor  # [N] int64, cache slot each row's K/V goes to
    write_rows: torch.Tensor  # [N] int64, row whose K/V is written there
    block_tables: torch.Tensor  # [B, max_blocks] int64
    context_lens: torch.Tensor  # [B] int32
    decode_rows: torch.Tensor | None  # [Bd] rows answered by the batched decode path; None = every row
    decode_seqs: torch.Tensor | None  # [Bd] their sequences
    prefill: list[PrefillChunk]

    @staticmethod
    def build(batch: ForwardBatch) -> "AttentionPlan":
        slots = batch.slot_mapping
        num_rows = slots.shape[0]
        # Padding rows (slot -1) must not write; a masked scatter is not capturable, so they re-write the first
        # real row's K/V to that row's slot (identical duplicates, so the result does not depend on order).
        # A batch with no real row at all (only warm-up) writes row 0's K/V to slot 0.
        real = slots >= 0
        first_real = torch.argmax(real.to(torch.int32))
        rows = torch.arange(num_rows, device=slots.device)
        write_rows = torch.where(real, rows, first_real)
        write_slots = torch.where(real, slots, slots[first_real].clamp(min=0))
        block_tables = batch.block_tables.long()
        if batch.is_decode:
            return AttentionPlan(write_slots, write_rows, block_tables, batch.context_lens, None, None, [])
        if len(batch.query_lens_host) != batch.num_seqs or len(batch.context_lens_host) != batch.num_seqs:
            raise ValueError("query_lens_host and context_lens_host need one entry per sequence")
        decode_rows, decode_seqs, prefill = [], [], []
        row = 0
        for seq, (num_new, context_len) in enumerate(zip(batch.query_lens_host, batch.context_lens_host)):
            if not 0 <= num_new <= context_len:
                raise ValueError(f"sequence {seq}: {num_new} new tokens but context length {context_len}")
            if num_new == 1:
                decode_rows.append(row)
                decode_seqs.append(seq)
            elif num_new > 1:
                prefill.append(PrefillChunk(seq, row, num_new, context_len))
            row += num_new
        if row != num_rows:
            raise ValueError(f"query_lens_host sums to {row}, but the batch has {num_rows} tokens")
        device = slots.device
        return AttentionPlan(
            write_slots, write_rows, block_tables, batch.context_lens,
            torch.tensor(decode_rows, dtype=torch.int64, device=device),
            torch.tensor(decode_seqs, dtype=torch.int64, device=device),
            prefill,
        )

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """kv_cache [2, num_blocks, block_size, Hkv, D]; k, v [N, Hkv, D]."""
        for cache, new in ((kv_cache[0], k), (kv_cache[1], v)):
            flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
            flat.index_copy_(0, self.write_slots, new[self.write_rows].to(cache.dtype))

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, sliding_window: int | None
    ) -> torch.Tensor:
        """q [N, Hq, D] (K/V already written) -> [N, Hq, D]."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if self.decode_rows is None:
            return decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, scale, sliding_window)
        out = torch.empty_like(q)
        if self.decode_rows.numel():
            out[self.decode_rows] = decode_attention(
                q[self.decode_rows], k_cache, v_cache, self.block_tables[self.decode_seqs],
                self.context_lens[self.decode_seqs], scale, sliding_window,
            )
        for chunk in self.prefill:
            rows = slice(chunk.row_start, chunk.row_start + chunk.num_new)
            out[rows] = prefill_attention(
                q[rows], k_cache, v_cache, self.block_tables[chunk.seq], chunk.context_len, scale, sliding_window
            )
        return out


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence at position context_len - 1
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    context_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = k_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    key_pos = torch.arange(k.shape[2], device=q.device)  # [L]
    lens = context_lens.view(-1, 1).to(key_pos.dtype)  # [B, 1]
    visible = key_pos < lens  # [B, L]
    if sliding_window is not None:
        visible &= key_pos >= lens - sliding_window
    visible |= (key_pos == 0) & (lens == 0)  # a padding sequence still sees one key: no all -inf row (NaN)
    # Grouped-query attention without repeating K/V: the query heads sharing a KV head become its query rows.
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor,  # [n, Hq, D], the last n positions of the sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int64
    context_len: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_new, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    blocks = block_table[: (context_len + block_size - 1) // block_size]
    k = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]  # [ctx, Hkv, D]
    v = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
    group = num_heads // num_kv_heads
    # Repeat K/V per query head: SDPA's memory-efficient kernel takes a mask but not grouped heads.
    k = k.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)  # [1, Hq, ctx, D]
    v = v.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    if num_new == context_len and sliding_window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        query_pos = torch.arange(context_len - num_new, context_len, device=q.device)[:, None]  # [n, 1]
        key_pos = torch.arange(context_len, device=q.device)[None, :]  # [1, ctx]
        visible = key_pos <= query_pos  # [n, ctx]
        if sliding_window is not None:
            visible &= key_pos > query_pos - sliding_window
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    return out[0].transpose(0, 1)  # [n, Hq, D]
