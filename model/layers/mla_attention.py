"""Multi-head latent attention (MLA) of DeepSeek-V2/V3 over a paged cache of compressed latents.

Per token the cache holds c = kv_a_layernorm(latent) [kv_lora_rank] and the rotated rope key k_pe [rope] that all
heads share — 576 values per layer for V2 and V3 instead of heads × (K + V). Keys and values of head h are
k_h = [W_UK_h · c, k_pe] and v_h = W_UV_h · c, with kv_b_proj.weight = [W_UK_h; W_UV_h] per head.
- decode rows use the absorbed form: q_latent_h = q_nope_h · W_UK_h, attention over the cache rows as they are
  (model/layers/mla_decode.py), then W_UV_h on the latent output — the keys are never decompressed;
- prefill chunks decompress their context (kv_b_proj on every cached row) and run SDPA over keys of width
  nope + rope and values zero-padded to that width (so flash attention applies): compute-bound work where
  decompressing once per chunk is the cheaper form. Chunks that start their sequence go together in one padded
  batch (model/layers/mla_prefill.py).
Parameter names are transformers' (q_proj or q_a_proj/q_a_layernorm/q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
kv_b_proj, o_proj), so checkpoints load as stored. In an FP8 model every projection but kv_b_proj may be FP8 (an
`Fp8Linear` swapped in by model/quantization.py); kv_b_proj always keeps the model dtype, since W_UK / W_UV are views
of its weight (model/quantization.py ALWAYS_HIGH_PRECISION; an FP8 checkpoint's is dequantised at load).
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers.fusion import gpu_fused
from model.layers.linear import Linear
from model.layers import mla_prefill
from model.layers.mla_decode import mla_decode
from model.layers.norm import RMSNorm
from model.layers.paged_attention import AttentionPlan, write_cache_rows
from model.layers.prefill_sdpa import prefill_sdpa
from model.layers.rotary import apply_rotary

LORA_NORM_EPS = 1e-6  # transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not rms_norm_eps


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(nope + rope), times YaRN's mscale(factor, mscale_all_dim)² when the rope is YaRN-scaled (DeepSeek's
    `yarn_get_mscale` as transformers applies it in DeepseekV3Attention)."""
    scale = config.mla.qk_head_dim**-0.5
    return scale * config.rope_yarn.softmax_scale_multiplier() if config.rope_yarn is not None else scale


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on adjacent pairs (x0, x1), (x2, x3)... (DeepSeek's layout), written as [even parts; odd parts]: the
    same values as transformers' interleaved rotation up to one fixed permutation of the rope dimensions, applied
    to queries and keys alike, so every q·k is the same. x [N, h, D], cos/sin [N, 1, D] (the halves repeat)."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].float(), sin[..., :half].float()
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1).to(x.dtype)


@gpu_fused
def apply_rotary_pairs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [N, Hq, D], k [N, 1, D], cos/sin [N, 1, D]: `rotate_pairs` of both, one fused kernel on the GPU."""
    return rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)


class MlaAttention(nn.Module):
    CACHE_BLOCK_DIM = 1  # the block_size dimension of a layer's cache [num_blocks, block_size, width]

    def __init__(self, config: ModelConfig, layer_idx: int, num_heads: int | None = None):
        """`num_heads`: the query heads held here (a tensor-parallel rank's share, model/parallel); the latent and
        rope key, and so the cache, are the same for any number of heads."""
        super().__init__()
        mla = config.mla
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads if num_heads is None else num_heads
        self.kv_lora_rank = mla.kv_lora_rank
        self.nope, self.rope, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.qk_dim = mla.qk_head_dim
        self.cache_width = mla.cache_width
        self.rope_pairs = mla.rope_pairs
        self.scale = softmax_scale(config)
        hidden, q_out = config.hidden_size, self.num_heads * self.qk_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, q_out)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=mla.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, q_out)
        self.q_lora = mla.q_lora_rank is not None
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope, bias=mla.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.num_heads * self.v_dim, hidden, bias=mla.attention_bias)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: [num_blocks, block_size, kv_lora_rank + rope]."""
        return (num_blocks, block_size, self.cache_width)

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        rotary: tuple[torch.Tensor, torch.Tensor],  # cos, sin [N, 1, rope]
        plan: AttentionPlan,
        kv_cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope]
    ) -> torch.Tensor:
        out = self.attend(*self.project(x, rotary), plan, kv_cache)  # [N, Hq, v]
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.v_dim))

    # The parts of forward, also called one by one by the piecewise CUDA graphs of mixed steps
    # (model/engine/step_pieces.py): `project` and `o_proj` are row-wise and captured, `attend` runs eagerly.
    def project(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        """x [N, H] -> q_nope [N, Hq, nope], q_pe [N, Hq, rope], latent [N, r] (normed), k_pe [N, 1, rope]."""
        num_rows = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(num_rows, self.num_heads, self.qk_dim).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [N, r]
        q_pe, k_pe = self._rotate(q_pe, k_pe.unsqueeze(1), rotary)  # [N, Hq, rope], [N, 1, rope]
        return q_nope, q_pe, latent, k_pe

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
               plan: AttentionPlan, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Write this step's latent and rope key to the cache, then attend: [N, Hq, v] (into `out` if given)."""
        num_rows = q_nope.shape[0]
        flat = kv_cache.view(-1, self.cache_width)  # [num_blocks * block_size, r + rope]: latent, then rope key
        write_cache_rows(latent, k_pe, flat, flat, self.kv_lora_rank, plan.write_rows, plan.write_slots)

        decode = plan.decode
        if decode is not None and decode.rows is None:  # a pure decode step (the CUDA-graph path)
            result = self._decode(q_nope, q_pe, kv_cache, decode)
            return result if out is None else out.copy_(result)
        out = q_nope.new_empty(num_rows, self.num_heads, self.v_dim) if out is None else out  # [N, Hq, v]
        if decode is not None:
            out[decode.rows] = self._decode(q_nope[decode.rows], q_pe[decode.rows], kv_cache, decode)
        chunks = plan.prefill
        starting = mla_prefill.fresh(chunks)  # nothing cached before them: batched, keys from this step's rows
        if kv_cache.dtype == latent.dtype and self.v_dim <= self.qk_dim and mla_prefill.worth_batching(starting):
            mla_prefill.batched_fresh_prefill(self, q_nope, q_pe, latent, k_pe, starting, out, derived=plan.derived)
            chunks = [c for c in chunks if all(c is not s for s in starting)]
        for chunk in chunks:
            out[chunk.rows] = self._prefill(q_nope[chunk.rows], q_pe[chunk.rows], flat, chunk)
        return out

    def _rotate(self, q_pe, k_pe, rotary):
        cos, sin = rotary
        return (apply_rotary_pairs if self.rope_pairs else apply_rotary)(q_pe, k_pe, cos, sin)

    def _per_head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [Hq, nope, r] and W_UV [Hq, v, r], views of kv_b_proj.weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]

    def _decode(self, q_nope, q_pe, kv_cache, decode) -> torch.Tensor:
        """Absorbed form: q_nope [B, Hq, nope], q_pe [B, Hq, rope] -> [B, Hq, v]."""
        w_uk, w_uv = self._per_head_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, Hq, r]
        q = torch.cat((q_latent, q_pe), dim=-1)  # [B, Hq, r + rope]
        out_latent = mla_decode(q, kv_cache, decode, self.scale, self.kv_lora_rank)  # [B, Hq, r]
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, Hq, v]

    def _prefill(self, q_nope, q_pe, flat_cache, chunk) -> torch.Tensor:
        """Decompressed: q [n, Hq, *] of the chunk's last n positions over its whole context -> [n, Hq, v]."""
        context = flat_cache.view(-1, chunk.block_size, self.cache_width)[chunk.blocks]
        context = context.view(-1, self.cache_width)[: chunk.context_len]  # [ctx, r + rope]
        latent, k_pe = context.to(q_nope.dtype).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope + self.v_dim)  # [ctx, Hq, nope + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)), dim=-1)  # [ctx, Hq, qk]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [n, Hq, qk]
        if self.v_dim < self.qk_dim:  # zero columns change nothing, and equal widths let SDPA pick flash attention
            v = F.pad(v, (0, self.qk_dim - self.v_dim))  # [ctx, Hq, qk]
        mask = chunk.mask(None)  # [n, ctx] bool, or None for plain causal (MLA layers have no window)
        heads_first = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731  [len, Hq, qk] -> [1, Hq, len, qk]
        out = prefill_sdpa(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask, is_causal=mask is None,
                           scale=self.scale)  # [1, Hq, n, qk]
        return out[0].transpose(0, 1)[..., : self.v_dim]  # [n, Hq, v]
