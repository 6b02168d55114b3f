"""Grouped-query self-attention with fused QKV projection, optional q/k RMSNorm and clipping, rotary embeddings,
a per-layer sliding window and optional learned sinks (gpt-oss), writing to and reading from the paged KV cache."""

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import triton_norm_rotary_write
from model.layers.linear import Linear
from model.layers.norm import RMSNorm
from model.layers.paged_attention import AttentionPlan
from model.layers.qk_norm_rotary import norm_rotary_qk
from model.layers.rotary import apply_rotary


class Attention(nn.Module):
    """`num_heads` / `num_kv_heads`: the heads this module holds, all of the model's by default (a tensor-parallel
    rank holds a slice of them, model/parallel)."""

    CACHE_BLOCK_DIM = 2  # the block_size dimension of a layer's cache [2, num_blocks, block_size, Hkv, D]

    def __init__(self, config: ModelConfig, layer_idx: int, num_heads: int | None = None,
                 num_kv_heads: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads if num_heads is None else num_heads
        self.num_kv_heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qk_norm = config.qk_norm
        self.clip_qkv = config.clip_qkv
        self.sliding_window = config.sliding_window_of(layer_idx)
        # One learned logit per query head (a tensor-parallel rank would hold its heads' slice).
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if config.attention_sinks else None
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm == "per_head":
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache: [K|V, num_blocks, block_size, KV heads held here, head_dim]."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        rotary: tuple[torch.Tensor, torch.Tensor],  # cos, sin [N, 1, R], R <= D rotary channels
        plan: AttentionPlan,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [N, (Hq + 2 Hkv) D]
        if self._one_launch_to_cache(qkv, kv_cache):  # norms, rotary and the K/V write in one Triton launch
            k_cache, v_cache = (kv_cache[i].view(-1, self.num_kv_heads, self.head_dim) for i in (0, 1))
            norms = (None, None, 0.0) if self.qk_norm == "none" else (
                self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)  # one eps: `_norms_fuse_with_rotary`
            q = triton_norm_rotary_write.norm_rotary_write(
                qkv, self.num_heads, self.num_kv_heads, self.head_dim, self.qk_norm, *norms, *rotary, k_cache,
                v_cache, plan.write_rows, plan.write_slots)
            out = plan.attend(q, kv_cache, self.scale, self.sliding_window, self.sinks)
        else:
            out = self.attend(*self.rotate(qkv, rotary), plan, kv_cache)  # [N, Hq, D]
        return self.o_proj(out.reshape(x.shape[0], self.q_size))

    def _one_launch_to_cache(self, qkv: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether forward takes model/layers/triton_norm_rotary_write.py: switched on (opt-in), a 16-bit CUDA qkv
        and a cache of its dtype (the unfused path rounds K to the model dtype before the cache's), norms it can
        compute (none, or the plain per-head or whole-row ones `_norms_fuse_with_rotary` takes), no clipping."""
        return (triton_norm_rotary_write.enabled() and qkv.is_cuda and qkv.dtype in triton_norm_rotary_write.DTYPES
                and kv_cache.dtype == qkv.dtype and kv_cache.is_contiguous() and self.clip_qkv is None
                and (self.qk_norm == "none" or self._norms_fuse_with_rotary())
                and triton_norm_rotary_write.available())

    # The three parts of forward, also called one by one by the piecewise CUDA graphs of mixed steps
    # (model/step_pieces.py): `project` and `o_proj` are row-wise and captured, `attend` runs eagerly between them.
    def project(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        """x [N, H] -> q [N, Hq, D], k, v [N, Hkv, D], rotary applied to q and k."""
        return self.rotate(self.qkv_proj(x), rotary)

    def rotate(self, qkv: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        """The fused projection's output [N, (Hq + 2 Hkv) D] -> q [N, Hq, D], k, v [N, Hkv, D], q and k normed (if
        the model does) and rotated."""
        num_rows = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self._norms_fuse_with_rotary():
            q, k = norm_rotary_qk(q.reshape(num_rows, self.num_heads, self.head_dim),
                                  k.reshape(num_rows, self.num_kv_heads, self.head_dim),
                                  self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, *rotary)
            return q, k, v.reshape(num_rows, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "full":  # OLMoE normalises the whole projection, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_rows, self.num_heads, self.head_dim)  # [N, Hq, D]
        k = k.reshape(num_rows, self.num_kv_heads, self.head_dim)  # [N, Hkv, D]
        v = v.reshape(num_rows, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":  # Qwen3 normalises each head
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, *rotary)
        return q, k, v

    def _norms_fuse_with_rotary(self) -> bool:
        """q/k norms and rotary in one fused function (model/layers/qk_norm_rotary.py): when the norms are local
        (a tensor-parallel rank's ShardedRMSNorm all-reduces) and no clipping sits between norm and rotary."""
        return (self.qk_norm != "none" and self.clip_qkv is None
                and type(self.q_norm) is RMSNorm and type(self.k_norm) is RMSNorm
                and self.q_norm.eps == self.k_norm.eps)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, kv_cache: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Write this step's K/V to the cache, then attend: [N, Hq, D] (into `out` if given)."""
        plan.write_kv(kv_cache, k, v)
        return plan.attend(q, kv_cache, self.scale, self.sliding_window, self.sinks, out=out)
