"""The decoder every MoE family runs: pre-norm attention + (MoE | dense MLP) blocks over a paged KV cache.
Families differ only in config fields (q/k norm, biases, shared expert, window) and checkpoint key names, both
read from their row of model/families.py.
"""

import math

import torch
from torch import nn

from model.config import ModelConfig
from model.forward_batch import ForwardBatch
from model.kv_groups import KvCacheGroups, null_block
from model.layers.attention import Attention
from model.layers.linear import Embedding, Linear, linear
from model.layers.mla_attention import MlaAttention
from model.layers.mlp import GatedMLP
from model.layers.moe import SparseMoeBlock, routing_of
from model.layers.norm import RMSNorm
from model.layers.paged_attention import AttentionPlan
from model.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MlaAttention(config, layer_idx) if config.mla is not None else Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(
                layer_idx, config.hidden_size, config.num_experts, config.top_k, config.moe_intermediate_size,
                renormalize=config.norm_topk_prob,
                shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                shared_expert_gated=config.shared_expert_gated,
                routing=routing_of(config),
                router=config.router, router_bias=config.router_bias, activation=config.expert_activation,
                expert_bias=config.expert_bias,
            )
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    # The residual stream travels as a pair (h, delta) whose sum is the stream: each layer's MLP output is added by
    # the next layer's input norm (one fused add + norm kernel instead of an add, then a norm; vLLM passes its
    # residual the same way), and the last one by the final norm.
    def forward(self, h: torch.Tensor, rotary, plan: AttentionPlan, kv_cache: torch.Tensor,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, delta) entering the layer -> (h, delta) leaving it; delta None: nothing pending (the first layer)."""
        h, normed = self.enter(h, delta)
        attn = self.self_attn(normed, rotary, plan, kv_cache)  # [N, H]
        return self.after_attention(h, attn)

    def enter(self, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream h + delta, its input norm) [N, H] each."""
        if delta is None:
            return h, self.input_layernorm(h)
        return self.input_layernorm.add_and_norm(h, delta)

    def after_attention(self, h: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, H] the stream entering this layer, attn [N, H] its attention's output -> (h + attn, the MLP's
        output): their sum is the stream after this layer."""
        h, normed = self.post_attention_layernorm.add_and_norm(h, attn)
        return h, self.mlp(normed)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoeCausalLM(nn.Module):
    """forward(batch, kv_cache) -> float32 logits of the rows `batch.logits_indices` selects."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.kv_groups = KvCacheGroups.of(config)

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """kv_cache [storage slots, *kv_cache_shape of one layer] -> logits [S, vocab] float32."""
        return self.head(self.hidden_states(batch, kv_cache))  # [S, V]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [S, H] -> float32 logits [S, V]."""
        return linear(h, self.head_weight()).float()  # decode rows: the Triton split-K kernel (an LM head's size)

    def hidden_states(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [S, H] of the rows `batch.logits_indices` selects (a tensor-parallel
        model, model/parallel, applies its own vocabulary-split head to them)."""
        plans = self.attention_plans(batch, kv_cache)
        h = self.model.embed_tokens(batch.input_ids)  # [N, H]
        rotary = self.model.rotary_emb(batch.positions, h.dtype)  # cos, sin [N, 1, R] (R: rotary channels)
        delta = None  # the last MLP output, not yet added (DecoderLayer.forward)
        for layer_idx, layer in enumerate(self.model.layers):
            h, delta = layer(h, rotary, *self.layer_attention_inputs(layer_idx, plans, kv_cache), delta)
        rows = batch.logits_indices  # the norm is per row, so only the wanted rows
        return self.model.norm.add_and_norm(h[rows], delta[rows])[1]  # [S, H]

    def attention_plans(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> list[AttentionPlan]:
        """One attention plan per KV-cache group for this step (what its layers share)."""
        block_size = kv_cache.shape[1 + self.model.layers[0].self_attn.CACHE_BLOCK_DIM]
        groups = self.kv_groups
        if batch.num_groups != groups.num_groups:
            raise ValueError(f"the batch has block tables for {batch.num_groups} KV-cache groups, the model "
                             f"{groups.num_groups}")
        plans = [AttentionPlan.build(batch.of_group(g), block_size=block_size, pad_slot=null_block(g) * block_size)
                 for g in range(groups.num_groups)]
        for plan in plans[1:]:
            plan.chunk_tables_from = plans[0]
        return plans

    def layer_attention_inputs(self, layer_idx: int, plans: list[AttentionPlan],
                               kv_cache: torch.Tensor) -> tuple[AttentionPlan, torch.Tensor]:
        """A layer's plan (its KV-cache group's tables) and its storage slot of the cache."""
        return plans[self.kv_groups.layer_group[layer_idx]], kv_cache[self.kv_groups.layer_slot[layer_idx]]

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight  # [V, H]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[storage slots, *one layer's cache]: by the attention kind, [K|V, blocks, block_size, KV heads held here,
        head_dim] (a tensor-parallel rank holds fewer heads) or MLA's [blocks, block_size, kv_lora_rank + rope].
        Slots = layers, except with sliding-window layers, whose groups share slots (model/kv_groups.py)."""
        attn = self.model.layers[0].self_attn
        return (self.kv_groups.num_slots, *attn.kv_cache_shape(num_blocks, block_size))

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return math.prod(self.kv_cache_shape(1, block_size)) * dtype.itemsize

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]
