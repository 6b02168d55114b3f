"""MLA prefill of the chunks that start a sequence (nothing cached before them) in one batched SDPA call.

`MlaAttention._prefill` serves one chunk at a time: gather its context from the cache, decompress it with kv_b_proj,
one SDPA call. A prefill step of many short prompts (64 × 512 tokens in bench_engine: 16 chunks per 8192-token step
per layer) then costs 16 small GEMMs and 16 SDPA launches per layer. A chunk with no cached context needs no cache
read: its keys come from this step's own latent rows. So all such chunks are decompressed by one kv_b_proj GEMM over
their rows, right-padded to the longest into [B, L, ...], and attended with one causal SDPA call (flash attention):
a real query at position i sees keys 0..i, all real, so the padding changes nothing it computes; padded query rows
are dropped. Padding costs attention work, so the batch is taken only while it at most doubles the tokens.
"""

import torch
import torch.nn.functional as F

MAX_PADDING_FACTOR = 2.0  # padded tokens / real tokens above which the chunks go one by one


def fresh(chunks: list) -> list:
    """The chunks with no cached context (their new tokens are their whole context)."""
    return [c for c in chunks if c.context_len == c.rows.stop - c.rows.start]


def worth_batching(chunks: list) -> bool:
    lengths = [c.rows.stop - c.rows.start for c in chunks]
    return len(lengths) > 1 and len(lengths) * max(lengths) <= MAX_PADDING_FACTOR * sum(lengths)


def batched_fresh_prefill(attn, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                          chunks: list, out: torch.Tensor) -> None:
    """Writes out[chunk.rows] [n, Hq, v] for each fresh chunk. q_nope [N, Hq, nope], q_pe [N, Hq, rope] (rotated),
    latent [N, r] (normed) and k_pe [N, 1, rope] (rotated) of the step's rows; `attn` an MlaAttention."""
    heads, nope, v_dim, qk = attn.num_heads, attn.nope, attn.v_dim, attn.qk_dim
    rows = [c.rows for c in chunks]
    lengths = [r.stop - r.start for r in rows]
    index = torch.cat([torch.arange(r.start, r.stop, device=latent.device) for r in rows])  # [M] the chunks' rows
    kv = attn.kv_b_proj(latent[index]).view(-1, heads, nope + v_dim)  # [M, Hq, nope + v]: one GEMM for all
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    k = torch.cat((k_nope, k_pe[index].expand(-1, heads, -1)), dim=-1)  # [M, Hq, qk]
    q = torch.cat((q_nope[index], q_pe[index]), dim=-1)  # [M, Hq, qk]
    if v_dim < qk:  # as _prefill: zero columns change nothing, and equal widths let SDPA pick flash attention
        v = F.pad(v, (0, qk - v_dim))

    def padded(x):  # [M, Hq, qk] -> [B, Hq, L, qk]
        return torch.nn.utils.rnn.pad_sequence(list(x.split(lengths)), batch_first=True).transpose(1, 2)

    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=attn.scale)
    o = o.transpose(1, 2)  # [B, L, Hq, qk]
    for b, r in enumerate(rows):
        out[r] = o[b, : lengths[b], :, :v_dim]
