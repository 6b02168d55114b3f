"""MLA decode attention in the absorbed form, over the paged latent cache.

A layer's cache is [num_blocks, block_size, kv_lora_rank + rope]: per token the normed latent c and the rotated
rope key k_pe. With W_UK folded into the query (q_latent = q_nope · W_UK, per head), every head's score against a
token is q_latent · c + q_pe · k_pe, i.e. one query of width kv_lora_rank + rope against the cache row as it is,
and the attention output in latent space is the softmax-weighted sum of the c parts (W_UV is applied after, by the
caller). So decode is multi-query attention with keys [L, r + rope] and values = the first r columns of the same
rows: one read of the latent cache per sequence for all heads.

Two implementations: `mla_decode_reference` (pure torch: gathers the blocks into a dense copy, one SDPA call;
the CPU path and the tests' reference) and the Triton kernel of model/layers/triton_mla_decode.py, used on CUDA
(STATICMOE_DECODE_ATTENTION=sdpa turns it off; a build failure falls back to the reference, as for the GQA kernel).
"""

import logging

import torch
import torch.nn.functional as F

from model.layers import paged_attention, triton_mla_decode, triton_paged

log = logging.getLogger(__name__)
_TRITON = {"mla": True}


def triton_mla_enabled(q: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> bool:
    return (q.device.type == "cuda" and _TRITON["mla"] and paged_attention._TRITON["decode"]
            and triton_paged.available() and triton_mla_decode.supported(kv_lora_rank, rope_dim))


def mla_decode_reference(
    q: torch.Tensor,  # [B, Hq, r + rope]: q_latent and the rotated q_pe
    latent_cache: torch.Tensor,  # [num_blocks, block_size, r + rope]
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    mask: torch.Tensor,  # [B, 1, 1, max_blocks * block_size] bool (paged_attention._decode_mask)
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """-> [B, Hq, r], the attention output in latent space."""
    num_seqs = q.shape[0]
    rows = latent_cache[block_tables].view(num_seqs, 1, -1, latent_cache.shape[-1])  # [B, 1, L, r + rope]
    values = rows[..., :kv_lora_rank]  # [B, 1, L, r]
    out = F.scaled_dot_product_attention(q.unsqueeze(1), rows, values, attn_mask=mask, scale=scale)  # [B,1,Hq,r]
    return out.squeeze(1)


def mla_decode(q: torch.Tensor, latent_cache: torch.Tensor, decode: "paged_attention.DecodeRows", scale: float,
               kv_lora_rank: int) -> torch.Tensor:
    """q [B, Hq, r + rope] of the decode rows -> [B, Hq, r]; the Triton kernel where it runs, else the reference."""
    if triton_mla_enabled(q, kv_lora_rank, latent_cache.shape[-1] - kv_lora_rank):
        try:
            return triton_mla_decode.paged_mla_decode(q, latent_cache, decode.block_tables, decode.context_lens,
                                                      scale, kv_lora_rank)
        except Exception as err:  # a Triton build problem must not take the model down
            _TRITON["mla"] = False
            log.warning("Triton MLA decode attention failed (%r); using the torch path from now on", err)
    if None not in decode.masks:  # full causal (MLA layers have no window); shared by the layers of the step
        decode.masks[None] = paged_attention._decode_mask(decode.context_lens, decode.num_keys, None)
    return mla_decode_reference(q, latent_cache, decode.block_tables, decode.masks[None], scale, kv_lora_rank)
