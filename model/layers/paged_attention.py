"""Attention over a paged KV cache, on CPU and GPU.

A layer's cache is [2, num_blocks, block_size, Hkv, D]. `AttentionPlan` holds what every layer of one step shares
(index tensors, masks), built once per step. Two paths:
- decode rows (one new token per sequence): fixed shapes and no host sync, so a decode step is CUDA-graph
  capturable. On CUDA with Triton, one kernel reads the keys straight from the cache blocks; elsewhere (or with
  STATICMOE_DECODE_ATTENTION=sdpa) the blocks are gathered into a dense copy for one batched SDPA call;
- prefill chunks: on CUDA with Triton, one kernel for all chunks of the step (`triton_prefill_attention`);
  elsewhere (or with STATICMOE_PREFILL_ATTENTION=sdpa) one SDPA call per chunk. Both use the host-side lengths
  the scheduler already knows.
Each layer passes its own window (gpt-oss alternates sliding-window and full layers) and, optionally, its learned
sinks: one logit per query head that joins the softmax's denominator with no value (out = Σ p_j v_j with
p_j = exp(s_j) / (Σ exp(s_i) + exp(sink))). The SDPA paths add the sink as one extra key of zeros whose score is
set by a float mask; the Triton kernels start each row's online softmax from the sink.
"""

import functools
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.forward_batch import ForwardBatch
from model.layers import triton_cache_write, triton_decode_attention, triton_paged, triton_prefill_attention

log = logging.getLogger(__name__)
_TRITON = {"decode": os.environ.get("STATICMOE_DECODE_ATTENTION", "triton") != "sdpa",
           "prefill": os.environ.get("STATICMOE_PREFILL_ATTENTION", "triton") != "sdpa",
           "cache_write": os.environ.get("STATICMOE_CACHE_WRITE", "triton") != "torch"}


def triton_decode_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and _TRITON["decode"] and triton_paged.available()


def triton_prefill_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and _TRITON["prefill"] and triton_paged.available()


def write_cache_rows(a: torch.Tensor, b: torch.Tensor, dst_a: torch.Tensor, dst_b: torch.Tensor, b_offset: int,
                     rows: torch.Tensor, slots: torch.Tensor) -> None:
    """dst_a[slots[i], :Wa] = a[rows[i]] and dst_b[slots[i], b_offset:b_offset + Wb] = b[rows[i]] (a, b [N, ...]
    flattened per row; dst_* [num_slots, width]): one Triton launch on CUDA (triton_cache_write.py), else torch
    (or with STATICMOE_CACHE_WRITE=torch)."""
    if a.device.type == "cuda" and _TRITON["cache_write"] and triton_paged.available():
        try:
            return triton_cache_write.write_cache_rows(a, b, dst_a, dst_b, b_offset, rows, slots)
        except Exception as err:  # as for attention: a Triton build problem falls back to torch
            _TRITON["cache_write"] = False
            log.warning("Triton cache write failed (%r); using torch from now on", err)
    a, b = a.flatten(1), b.flatten(1)
    wa, wb = a.shape[1], b.shape[1]
    if dst_a.data_ptr() == dst_b.data_ptr() and b_offset == wa:  # one cache row holds both (MLA): one copy
        dst_a[:, : wa + wb].index_copy_(0, slots, torch.cat((a, b), -1)[rows].to(dst_a.dtype))
        return
    dst_a[:, :wa].index_copy_(0, slots, a[rows].to(dst_a.dtype))
    dst_b[:, b_offset : b_offset + wb].index_copy_(0, slots, b[rows].to(dst_b.dtype))


@dataclass
class PrefillChunk:
    rows: slice  # its new tokens in the flat batch
    seq: int  # its row of the step's block tables
    context_len: int  # cached + new
    tables: torch.Tensor  # [B, max_blocks] int64, the step's block tables
    block_size: int
    masks: dict = field(default_factory=dict)  # window -> mask, shared by the layers of the step

    # What the per-chunk SDPA path needs; built on first use and then shared by the layers of the step.
    @functools.cached_property
    def blocks(self) -> torch.Tensor:  # [ceil(context_len / block_size)] int64
        return self.tables[self.seq, : (self.context_len + self.block_size - 1) // self.block_size]

    def mask(self, window: int | None) -> torch.Tensor | None:  # [n, context_len] bool; None = plain causal
        if window not in self.masks:
            num_new = self.rows.stop - self.rows.start
            self.masks[window] = _prefill_mask(num_new, self.context_len, window, self.tables.device)
        return self.masks[window]


@dataclass
class DecodeRows:
    rows: torch.Tensor | None  # [Bd] rows of the flat batch; None = every row, in sequence order
    block_tables: torch.Tensor  # [Bd, max_blocks] int64
    context_lens: torch.Tensor  # [Bd]
    num_keys: int  # max_blocks * block_size
    masks: dict = field(default_factory=dict)  # window -> [Bd, 1, 1, num_keys] bool for SDPA, shared by layers

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
        if triton_decode_enabled(q.device):
            try:
                return triton_decode_attention.paged_decode_attention(
                    q, k_cache, v_cache, self.block_tables, self.context_lens, scale, window, sinks=sinks)
            except Exception as err:  # a Triton build problem must not take the model down: use SDPA instead
                _TRITON["decode"] = False
                log.warning("Triton decode attention failed (%r); using SDPA from now on", err)
        if window not in self.masks:
            self.masks[window] = _decode_mask(self.context_lens, self.num_keys, window)
        return decode_attention(q, k_cache, v_cache, self.block_tables, self.masks[window], scale, sinks)


def _decode_mask(context_lens: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    key_pos = torch.arange(num_keys, device=context_lens.device)  # [L]
    lens = context_lens.view(-1, 1).to(key_pos.dtype)  # [B, 1]; the query sits at position len - 1
    visible = key_pos < lens  # [B, L]
    if sliding_window is not None:
        visible &= key_pos >= lens - sliding_window
    visible |= (key_pos == 0) & (lens == 0)  # a padding sequence still sees one key: no all -inf row (NaN)
    return visible[:, None, None, :]


def _prefill_mask(num_new: int, context_len: int, sliding_window: int | None, device,
                  always: bool = False) -> torch.Tensor | None:
    if num_new == context_len and sliding_window is None and not always:
        return None
    query_pos = torch.arange(context_len - num_new, context_len, device=device)[:, None]  # [n, 1]
    key_pos = torch.arange(context_len, device=device)[None, :]  # [1, ctx]
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible  # [n, ctx]


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor  # [N] int64, cache slot each row's K/V goes to
    write_rows: torch.Tensor  # [N] int64, row whose K/V is written there
    decode: DecodeRows | None
    prefill: list[PrefillChunk]
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int64
    _kernel_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # see _prefill_kernel_tables
    # The plan of another KV-cache group of the same step (model/kv_groups.py): its chunk metadata is the same
    # (only the block tables differ), so it is built once, by that plan.
    chunk_tables_from: "AttentionPlan | None" = None
    # Values a layer derives from this plan, built by the step's first layer and kept for the others (key -> value).
    derived: dict = field(default_factory=dict)

    @staticmethod
    def build(batch: ForwardBatch, block_size: int, pad_slot: int = 0) -> "AttentionPlan":
        """`pad_slot`: the first slot of the padding block of the batch's KV-cache group (model/kv_groups.py)."""
        slots = batch.slot_mapping
        device = slots.device
        # Padding rows (slot -1) must not write; a masked scatter is not capturable, so they re-write the first
        # real row's K/V to that row's slot (identical duplicates, so the result does not depend on order).
        # A batch with no real row at all (only warm-up) writes row 0's K/V (the padding token's) to `pad_slot`:
        # its own group's padding block, never another group's, which may share this layer's storage slot.
        real = slots >= 0
        first_real = torch.argmax(real.to(torch.int32)).view(1)  # [1]
        write_rows = torch.where(real, torch.arange(slots.shape[0], device=device), first_real)
        write_slots = torch.where(real, slots, slots.index_select(0, first_real).clamp(min=pad_slot))
        tables = batch.block_tables.long()  # [B, max_blocks]
        num_keys = tables.shape[1] * block_size
        if batch.is_decode:
            decode = DecodeRows(None, tables, batch.context_lens, num_keys)
            return AttentionPlan(write_slots, write_rows, decode, [], tables)

        if len(batch.query_lens_host) != batch.num_seqs or len(batch.context_lens_host) != batch.num_seqs:
            raise ValueError("query_lens_host and context_lens_host need one entry per sequence")
        decode_rows, decode_seqs, prefill, row = [], [], [], 0
        for seq, (num_new, context_len) in enumerate(zip(batch.query_lens_host, batch.context_lens_host)):
            if not 0 <= num_new <= context_len:
                raise ValueError(f"sequence {seq}: {num_new} new tokens but context length {context_len}")
            if num_new == 1:
                decode_rows.append(row)
                decode_seqs.append(seq)
            elif num_new > 1:
                prefill.append(PrefillChunk(slice(row, row + num_new), seq, context_len, tables, block_size))
            row += num_new
        if row != slots.shape[0]:
            raise ValueError(f"query_lens_host sums to {row}, but the batch has {slots.shape[0]} tokens")
        decode = None
        if decode_rows:
            seqs = torch.tensor(decode_seqs, dtype=torch.int64, device=device)
            decode = DecodeRows(torch.tensor(decode_rows, dtype=torch.int64, device=device), tables[seqs],
                                batch.context_lens[seqs], num_keys)
        return AttentionPlan(write_slots, write_rows, decode, prefill, tables)

    def _prefill_kernel_tables(self, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The Triton prefill kernel's chunk metadata and tiles, built at the first layer and kept for the rest."""
        if self.chunk_tables_from is not None:
            return self.chunk_tables_from._prefill_kernel_tables(head_dim)
        if self._kernel_tables is None:
            c = self.prefill
            self._kernel_tables = triton_prefill_attention.chunk_tables(
                [x.rows.start for x in c], [x.rows.stop - x.rows.start for x in c], [x.context_len for x in c],
                [x.seq for x in c], triton_prefill_attention.block_m_for(head_dim), self.block_tables.device)
        return self._kernel_tables

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """kv_cache [2, num_blocks, block_size, Hkv, D]; k, v [N, Hkv, D]."""
        width = kv_cache.shape[-2] * kv_cache.shape[-1]
        k_flat, v_flat = kv_cache[0].view(-1, width), kv_cache[1].view(-1, width)  # [num_blocks * block_size, Hkv*D]
        write_cache_rows(k, v, k_flat, v_flat, 0, self.write_rows, self.write_slots)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float, window: int | None = None,
               sinks: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [N, Hq, D] (this step's K/V already written) -> [N, Hq, D], written into `out` if given. `window`:
        this layer's sliding window (None = full causal); `sinks` [Hq]: its learned sink logits, or None."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if self.decode is not None and self.decode.rows is None:
            result = self.decode.attend(q, k_cache, v_cache, scale, window, sinks)
            return result if out is None else out.copy_(result)
        out = torch.empty_like(q) if out is None else out
        if self.decode is not None:
            out[self.decode.rows] = self.decode.attend(q[self.decode.rows], k_cache, v_cache, scale, window, sinks)
        if self.prefill and triton_prefill_enabled(q.device):
            try:
                triton_prefill_attention.paged_prefill_attention(
                    q.contiguous(), k_cache, v_cache, self.block_tables, *self._prefill_kernel_tables(q.shape[2]),
                    out, scale, window, sinks=sinks)
                return out
            except Exception as err:  # as for decode: a Triton build problem falls back to SDPA
                _TRITON["prefill"] = False
                log.warning("Triton prefill attention failed (%r); using SDPA from now on", err)
        for chunk in self.prefill:
            out[chunk.rows] = prefill_attention(q[chunk.rows], k_cache, v_cache, chunk.blocks, chunk.context_len,
                                                chunk.mask(window), scale, sinks)
        return out


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    mask: torch.Tensor,  # [B, 1, 1, max_blocks * block_size] bool
    scale: float,
    sinks: torch.Tensor | None = None,  # [Hq]
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # Grouped-query attention without repeating K/V: the query heads sharing a KV head become its query rows.
    q = q.view(num_seqs, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    if sinks is not None:
        k, v, mask = _with_sink_key(k, v, mask.expand(num_seqs, num_kv_heads, group, -1),
                                    sinks.view(1, num_kv_heads, group, 1), q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor,  # [n, Hq, D], the last n positions of the sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    blocks: torch.Tensor,  # [ceil(context_len / block_size)] int64
    context_len: int,
    mask: torch.Tensor | None,  # [n, context_len] bool, None = causal
    scale: float,
    sinks: torch.Tensor | None = None,  # [Hq]
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    k = k_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]  # [ctx, Hkv, D]
    v = v_cache[blocks].view(-1, num_kv_heads, head_dim)[:context_len]
    group = num_heads // num_kv_heads
    # Repeat K/V per query head: SDPA's memory-efficient kernel takes a mask but not grouped heads.
    k = k.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)  # [1, Hq, ctx, D]
    v = v.transpose(0, 1).repeat_interleave(group, dim=0).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    if sinks is not None:
        n = q.shape[2]
        if mask is None:
            mask = _prefill_mask(n, context_len, None, q.device, always=True)
        k, v, mask = _with_sink_key(k, v, mask.expand(1, num_heads, n, context_len), sinks.view(1, num_heads, 1, 1),
                                    q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[0].transpose(0, 1)  # [n, Hq, D]


def _with_sink_key(k, v, visible, sinks, dtype):
    """The sinks as one more key: zeros in K and V (it adds to the denominator, nothing to the output) whose score
    a float mask sets to the sink. k, v [B, Hk, L, D]; visible [B, Hq', n, L] bool; sinks broadcast to
    [B, Hq', n, 1]. Returns k, v [B, Hk, L + 1, D] and the float mask [B, Hq', n, L + 1]."""
    zeros = k.new_zeros(*k.shape[:2], 1, k.shape[3])
    bias = torch.zeros(visible.shape, dtype=dtype, device=k.device).masked_fill(~visible, float("-inf"))
    sink = sinks.to(dtype).expand(*visible.shape[:3], 1)
    return torch.cat((k, zeros), dim=2), torch.cat((v, zeros), dim=2), torch.cat((bias, sink), dim=-1)
