"""`ParallelCausalLM`: one rank's shard of a MoE model, made by transforming the plain model (built on the meta
device, so no global weight is ever allocated), and the `ShardSpec` of every split parameter for the loader.

The transform swaps modules and never changes a forward: attention gets the rank's heads (a smaller `Attention` or
`MlaAttention`, whose latent cache stays whole) and a row-parallel output projection, the MoE block its shard of the
experts op (`ShardedExperts`) and a forward hook that all-reduces its output (routed plus shared-expert partial
sums), dense MLPs and the shared expert their columns, the embedding and LM head their vocabulary rows. Per decoder
layer the forward has two all-reduces (attention output; MoE or dense MLP output), as a dense tensor-parallel
transformer; plus one for the embedding and an all-gather of the vocabulary-split logits.
"""

import torch
from torch import nn

from model.config import ModelConfig
from model.decoder import MoeCausalLM
from model.layers.attention import Attention
from model.layers.linear import Linear, linear
from model.layers.mla_attention import MlaAttention
from model.layers.mlp import GatedMLP
from model.layers.moe import SparseMoeBlock
from model.layers.rotary import RotaryEmbedding
from model.loader import _default_dtype
from model.parallel.comm import Comm
from model.parallel.config import RankLayout
from model.parallel.expert_parallel import ShardedExperts
from model.parallel.layers import RowParallelLinear, ShardedRMSNorm, VocabParallelEmbedding
from model.parallel.sharding import ShardSpec, replicated, split_dim, with_split

_BUFFERS = ("cos_cache", "sin_cache", "expert_load")  # recomputed after allocation (to_empty leaves them garbage)


def meta_model(config: ModelConfig) -> MoeCausalLM:
    """The plain model with shape-only parameters: global names and shapes, no memory."""
    with torch.device("meta"):
        return MoeCausalLM(config)


class ParallelCausalLM(nn.Module):
    """Same face as `MoeCausalLM` for the engine (config, forward, kv_cache_shape, moe_blocks); parameters under
    `lm.` keep the plain model's names, so checkpoints map one to one."""

    def __init__(self, lm: MoeCausalLM, layout: RankLayout, comm: Comm, specs: dict[str, ShardSpec],
                 agree_min=None):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.layout = layout
        self.comm = comm
        self.shard_specs = specs  # parameter name (within lm) -> spec; absent = replicated
        self._agree_min = agree_min  # callable: the minimum of an int over all ranks

    def spec(self, name: str) -> ShardSpec:
        return self.shard_specs.get(name) or replicated(tuple(self.lm.get_parameter(name).shape))

    def forward(self, batch, kv_cache: torch.Tensor) -> torch.Tensor:
        """kv_cache [num_layers, *one layer's cache] (GQA: [2, blocks, block_size, local Hkv, D]; MLA: the whole
        latent cache [blocks, block_size, kv_lora_rank + rope] on every rank) -> logits [S, vocab] float32."""
        h = self.lm.hidden_states(batch, kv_cache)  # [S, H]
        logits = self.comm.all_gather_columns(linear(h, self.lm.head_weight()))  # [S, W * rows]
        return logits[:, : self.config.vocab_size].float()

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return self.lm.kv_cache_shape(num_blocks, block_size)

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.lm.kv_cache_bytes_per_block(block_size, dtype)

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return self.lm.moe_blocks()

    def agree_on_num_blocks(self, num_blocks: int) -> int:
        """Every rank sizes its KV cache from its own free memory; all must use the smallest."""
        return num_blocks if self._agree_min is None else self._agree_min(num_blocks)


def _columns_of_gated(mlp: GatedMLP, prefix: str, columns: tuple[int, int], comm: Comm, reduce: bool,
                      shapes: dict, specs: dict) -> None:
    """Gate/up rows [c0, c1) and [I + c0, I + c1); down projection columns [c0, c1), row-parallel."""
    (c0, c1), inter = columns, mlp.down_proj.in_features
    hidden = mlp.gate_up_proj.in_features
    mlp.gate_up_proj = Linear(hidden, 2 * (c1 - c0))
    mlp.down_proj = RowParallelLinear(c1 - c0, hidden, False, comm, reduce)
    specs[prefix + "gate_up_proj.weight"] = split_dim(shapes[prefix + "gate_up_proj.weight"], 0,
                                                      [(c0, c1), (inter + c0, inter + c1)])
    specs[prefix + "down_proj.weight"] = split_dim(shapes[prefix + "down_proj.weight"], 1, [(c0, c1)])


def _shard_attention(layer_idx: int, config: ModelConfig, layout: RankLayout, comm: Comm, prefix: str,
                     shapes: dict, specs: dict) -> Attention:
    d = config.head_dim
    (q0, q1), (k0, k1) = layout.q_heads, layout.kv_heads
    q_global, kv_global = config.num_heads * d, config.num_kv_heads * d
    attn = Attention(config, layer_idx, num_heads=q1 - q0, num_kv_heads=k1 - k0)
    rows = [(q0 * d, q1 * d), (q_global + k0 * d, q_global + k1 * d),
            (q_global + kv_global + k0 * d, q_global + kv_global + k1 * d)]
    for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
        name = prefix + "qkv_proj." + kind
        specs[name] = split_dim(shapes[name], 0, rows)
    attn.o_proj = RowParallelLinear(attn.q_size, config.hidden_size, config.o_bias, comm, reduce=True)
    specs[prefix + "o_proj.weight"] = split_dim(shapes[prefix + "o_proj.weight"], 1, [(q0 * d, q1 * d)])
    if config.qk_norm == "full":  # normalised over all heads: the squared sum crosses ranks
        attn.q_norm = ShardedRMSNorm(attn.q_size, q_global, 1, config.rms_norm_eps, comm)
        attn.k_norm = ShardedRMSNorm(attn.kv_size, kv_global, layout.kv_replicas, config.rms_norm_eps, comm)
        specs[prefix + "q_norm.weight"] = split_dim(shapes[prefix + "q_norm.weight"], 0, [(q0 * d, q1 * d)])
        specs[prefix + "k_norm.weight"] = split_dim(shapes[prefix + "k_norm.weight"], 0, [(k0 * d, k1 * d)])
    return attn


def _shard_mla_attention(layer_idx: int, config: ModelConfig, layout: RankLayout, comm: Comm, prefix: str,
                         shapes: dict, specs: dict) -> MlaAttention:
    """The rank's query heads [h0, h1): their rows of q_proj / q_b_proj (nope + rope each) and of kv_b_proj
    (W_UK_h then W_UV_h, nope + v each), their v columns of o_proj (row-parallel, all-reduced). q_a_proj,
    q_a_layernorm, kv_a_proj_with_mqa and kv_a_layernorm stay whole: every rank computes the latent and rope key of
    every token and writes the whole latent cache itself (the cache is replicated, its width does not shrink), so the
    absorbed decode and the prefill decompression need no communication."""
    mla, (h0, h1) = config.mla, layout.q_heads
    attn = MlaAttention(config, layer_idx, num_heads=h1 - h0)
    q_name = prefix + ("q_b_proj.weight" if attn.q_lora else "q_proj.weight")
    specs[q_name] = split_dim(shapes[q_name], 0, [(h0 * mla.qk_head_dim, h1 * mla.qk_head_dim)])
    kv_rows = mla.qk_nope_head_dim + mla.v_head_dim
    specs[prefix + "kv_b_proj.weight"] = split_dim(shapes[prefix + "kv_b_proj.weight"], 0,
                                                   [(h0 * kv_rows, h1 * kv_rows)])
    attn.o_proj = RowParallelLinear((h1 - h0) * mla.v_head_dim, config.hidden_size, mla.attention_bias, comm,
                                    reduce=True)
    specs[prefix + "o_proj.weight"] = split_dim(shapes[prefix + "o_proj.weight"], 1,
                                                [(h0 * mla.v_head_dim, h1 * mla.v_head_dim)])
    return attn


def _shard_moe(block: SparseMoeBlock, config: ModelConfig, layout: RankLayout, comm: Comm, prefix: str,
               shapes: dict, specs: dict) -> None:
    if block.shared_expert is not None:  # its down projection must not reduce: summed with the experts' below
        _columns_of_gated(block.shared_expert, prefix + "shared_expert.", layout.shared_columns, comm, False,
                          shapes, specs)
    block.experts = ShardedExperts(config.num_experts, config.hidden_size, layout.experts, layout.moe_columns)
    block.register_forward_hook(lambda module, args, out: comm.all_reduce(out))  # one sum of all partial outputs
    (c0, c1), inter = layout.moe_columns, config.moe_intermediate_size
    gate_up, down = prefix + "experts.gate_up_proj", prefix + "experts.down_proj"
    specs[gate_up] = with_split(split_dim(shapes[gate_up], 0, [layout.experts]), 1,
                                [(c0, c1), (inter + c0, inter + c1)])
    specs[down] = with_split(split_dim(shapes[down], 0, [layout.experts]), 2, [(c0, c1)])


def _shard(lm: MoeCausalLM, config: ModelConfig, layout: RankLayout, comm: Comm) -> dict[str, ShardSpec]:
    shapes = {name: tuple(p.shape) for name, p in lm.named_parameters()}
    specs: dict[str, ShardSpec] = {}
    rows = layout.vocab_rows_per_rank
    lm.model.embed_tokens = VocabParallelEmbedding(rows, config.hidden_size, layout.vocab[0], comm)
    specs["model.embed_tokens.weight"] = split_dim(shapes["model.embed_tokens.weight"], 0, [layout.vocab], rows)
    if lm.lm_head is not None:
        lm.lm_head = Linear(config.hidden_size, rows)
        specs["lm_head.weight"] = split_dim(shapes["lm_head.weight"], 0, [layout.vocab], rows)
    for i, layer in enumerate(lm.model.layers):
        prefix = f"model.layers.{i}."
        shard_attention = _shard_attention if config.mla is None else _shard_mla_attention
        layer.self_attn = shard_attention(i, config, layout, comm, prefix + "self_attn.", shapes, specs)
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, config, layout, comm, prefix + "mlp.", shapes, specs)
        else:
            _columns_of_gated(layer.mlp, prefix + "mlp.", layout.dense_columns, comm, True, shapes, specs)
    return specs


def build_parallel_model(config: ModelConfig, layout: RankLayout, comm: Comm, dtype: torch.dtype,
                         device: torch.device | str, agree_min=None) -> ParallelCausalLM:
    """The rank's shard with uninitialised parameters on `device` (only local sizes are ever allocated)."""
    with torch.device("meta"), _default_dtype(dtype):
        lm = MoeCausalLM(config)
        specs = _shard(lm, config, layout, comm)
    for name, param in lm.named_parameters():
        expected = specs[name].local_shape if name in specs else tuple(param.shape)
        if tuple(param.shape) != expected:
            raise AssertionError(f"{name}: local shape {tuple(param.shape)} != spec {expected}")
    unknown = {name.rsplit(".", 1)[-1] for name, _ in lm.named_buffers()} - set(_BUFFERS)
    if unknown:
        raise AssertionError(f"buffers {sorted(unknown)} would be left uninitialised by to_empty")
    lm.to_empty(device=device)
    with torch.device(device):
        lm.model.rotary_emb = RotaryEmbedding.from_config(config)
    for block in lm.moe_blocks():
        block.experts.expert_load.zero_()
    model = ParallelCausalLM(lm, layout, comm, specs, agree_min)
    return model.eval().requires_grad_(False)
