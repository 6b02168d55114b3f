"""MLA prefill of the chunks that start a sequence (nothing cached before them) in one batched SDPA call.

`MlaAttention._prefill` serves one chunk at a time: gather its context from the cache, decompress it with kv_b_proj,
one SDPA call. A prefill step of many short prompts (64 × 512 tokens in bench_engine: 16 chunks per 8192-token step
per layer) then costs 16 small GEMMs and 16 SDPA launches per layer. A chunk with no cached context needs no cache
read: its keys come from this step's own latent rows. So all such chunks are decompressed by one kv_b_proj GEMM over
their rows, right-padded to the longest into [B, L, ...], and attended with one causal SDPA call (flash attention):
a real query at position i sees keys 0..i, all real, so the padding changes nothing it computes; padded query rows
are dropped. Padding costs attention work, so the batch is taken only while it at most doubles the tokens.
Which row goes where (`FreshLayout`) is computed once per step and shared by its layers, so each layer costs a
fixed handful of launches (gathers, the GEMM, SDPA, one scatter), not a few per chunk.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.layers.prefill_sdpa import prefill_sdpa

MAX_PADDING_FACTOR = 2.0  # padded tokens / real tokens above which the chunks go one by one


def fresh(chunks: list) -> list:
    """The chunks with no cached context (their new tokens are their whole context)."""
    return [c for c in chunks if c.context_len == c.rows.stop - c.rows.start]


def worth_batching(chunks: list) -> bool:
    lengths = [c.rows.stop - c.rows.start for c in chunks]
    return len(lengths) > 1 and len(lengths) * max(lengths) <= MAX_PADDING_FACTOR * sum(lengths)


@dataclass(frozen=True)
class FreshLayout:
    """Where the fresh chunks' rows go in the padded batch, the same for every layer of a step (built once)."""
    padded_rows: torch.Tensor  # [B * L] int64: the step row each padded position holds, chunk after chunk
    #                            (padding: a copy of its chunk's first row: finite, and never a key a real query sees)
    rows: torch.Tensor  # [M] int64: the chunks' rows of the step, chunk after chunk
    unpadded: torch.Tensor  # [M] int64 into the flattened [B * L]: where each of `rows` sits
    batch: int  # B chunks
    width: int  # L: the longest chunk


def fresh_layout(chunks: list, device: torch.device) -> FreshLayout:
    lengths = torch.tensor([c.rows.stop - c.rows.start for c in chunks])  # [B]
    starts = torch.tensor([c.rows.start for c in chunks])  # [B] rows of the step
    width = int(lengths.max())
    pos = torch.arange(width)  # [L]
    real = pos[None, :] < lengths[:, None]  # [B, L]
    padded_rows = starts[:, None] + torch.where(real, pos[None, :], 0)  # [B, L]
    flat = torch.arange(len(chunks))[:, None] * width + pos[None, :]  # [B, L]
    pinned = device.type == "cuda"  # an asynchronous copy needs pinned host memory (a pageable one stages and waits)
    on_device = [(t.pin_memory() if pinned else t).to(device, non_blocking=True)
                 for t in (padded_rows.flatten(), padded_rows[real], flat[real])]  # boolean indexing keeps row order
    return FreshLayout(*on_device, batch=len(chunks), width=width)


def batched_fresh_prefill(attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                          chunks: list, out: torch.Tensor, derived: dict | None = None) -> None:
    """Writes out[chunk.rows] [n, Hq, v] for each fresh chunk. q_nope [N, Hq, nope], q_pe [N, Hq, rope] (rotated),
    latent [N, r] (normed) and k_pe [N, 1, rope] (rotated) of the step's rows; `attn` an MlaAttention; `derived`:
    the step's per-plan cache (AttentionPlan.derived), where the layout is kept for the other layers. A fixed
    number of launches per layer: the inputs gathered straight into the padded order (padding rows go through
    kv_b_proj too: at most as many as real ones, see worth_batching, and none when the chunks are equally long),
    one kv_b_proj GEMM, one SDPA, one scatter back."""
    heads, nope, v_dim, qk = attn.num_heads, attn.nope, attn.v_dim, attn.qk_dim
    derived = {} if derived is None else derived
    key = ("mla_fresh_layout", tuple((c.rows.start, c.rows.stop) for c in chunks))
    if key not in derived:
        derived[key] = fresh_layout(chunks, latent.device)
    layout = derived[key]
    idx = layout.padded_rows  # [B * L]
    kv = attn.kv_b_proj(latent[idx]).view(-1, heads, nope + v_dim)  # [B * L, Hq, nope + v]: one GEMM for all
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    k = torch.cat((k_nope, k_pe[idx].expand(-1, heads, -1)), dim=-1)  # [B * L, Hq, qk]
    q = torch.cat((q_nope[idx], q_pe[idx]), dim=-1)  # [B * L, Hq, qk]
    if v_dim < qk:  # as _prefill: zero columns change nothing, and equal widths let SDPA pick flash attention
        v = F.pad(v, (0, qk - v_dim))

    def heads_first(x):  # [B * L, Hq, qk] -> [B, Hq, L, qk]
        return x.view(layout.batch, layout.width, heads, qk).transpose(1, 2)

    o = prefill_sdpa(heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=attn.scale)
    o = o.transpose(1, 2).reshape(-1, heads, qk)  # [B * L, Hq, qk]
    out[layout.rows] = o[layout.unpadded, :, :v_dim]
