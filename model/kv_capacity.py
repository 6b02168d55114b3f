"""How many tokens a KV-cache budget holds for a model, with the cache layout the engine allocates
(`model.kv_cache_shape`, which depends on the attention kind) beside the layout without latent compression.

    python -m model.kv_capacity deepseek-v2-lite --memory-gib 40
    python -m model.kv_capacity deepseek-v3 --memory-gib 40 --tensor-parallel 8   # one rank's 40 GiB

For MLA (DeepSeek-V2/V3) the cache holds kv_lora_rank + rope values per token per layer (576), where decompressed
keys and values would take heads × (nope + rope + v) (V2-Lite: 16 × 320 = 5120, 8.9× as many).

Sliding-window models (gpt-oss, Mixtral with a window; model/kv_groups.py): a block id spans the cache's storage
slots (gpt-oss-20b: 12 for 24 layers), and a sliding layer's blocks behind its window are freed. So for long
sequences a token costs one block of the full-attention group only: `tokens` counts those, and each sequence also
holds at most `sliding_blocks_per_sequence` blocks (its windows, decoding). The other layout ("uncompressed")
keeps every layer's keys and values for the whole sequence: gpt-oss gets about 2× the tokens of it. Without a full
group (Mixtral with a window) a sequence's blocks do not grow with its length at all; `tokens` is then the
pool's size in tokens, shared by the sequences' windows.
"""

import argparse
import math
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.kv_groups import KvCacheGroups, blocks_in_window


@dataclass(frozen=True)
class KvCapacity:
    bytes_per_token: int  # one token of a block id: all storage slots, the layout the engine allocates
    uncompressed_bytes_per_token: int  # all layers, decompressed keys and values, none freed
    tokens: int  # that fit the budget, in whole blocks, less the engine's padding blocks (one per KV-cache group)
    uncompressed_tokens: int
    sliding_blocks_per_sequence: int = 0  # at most, decoding, besides its `tokens` (sliding groups' windows)

    @property
    def ratio(self) -> float:
        return self.tokens / max(1, self.uncompressed_tokens)


def values_per_token_per_layer(config: ModelConfig, tensor_parallel: int = 1) -> tuple[int, int]:
    """(cached, uncompressed) values per token per layer on one of `tensor_parallel` ranks (model/parallel). The
    latent cache is whole on every rank (all heads read it), where decompressed keys and values would be split by
    heads: MLA's ratio shrinks by the rank count (V3: 71× on one GPU, 8.9× per rank on 8). A GQA rank holds its
    share of the K/V heads, at least one."""
    if config.mla is not None:
        return config.mla.cache_width, config.mla.uncompressed_cache_width(config.num_heads // tensor_parallel)
    plain = 2 * max(1, config.num_kv_heads // tensor_parallel) * config.head_dim
    return plain, plain


def _tokens(budget: int, bytes_per_token: int, block_size: int, reserved: int = 1) -> int:
    blocks = budget // (bytes_per_token * block_size) - reserved  # model_runner keeps padding blocks
    return max(0, blocks) * block_size


def kv_capacity(config: ModelConfig, memory_bytes: int, dtype: torch.dtype = torch.bfloat16,
                block_size: int = 16, model=None, tensor_parallel: int = 1) -> KvCapacity:
    """`memory_bytes` of one rank of `tensor_parallel`. `model` (optional, e.g. built on the meta device; the
    rank's own model under tensor parallelism): take the cached size from its `kv_cache_shape`, the engine's own
    computation, instead of the config."""
    cached, uncompressed = values_per_token_per_layer(config, tensor_parallel)
    groups = KvCacheGroups.of(config)
    per_token = cached * groups.num_slots * dtype.itemsize
    if model is not None:
        per_token = math.prod(model.kv_cache_shape(1, block_size)) * dtype.itemsize // block_size
    full = uncompressed * config.num_layers * dtype.itemsize
    sliding = sum(blocks_in_window(w, 1, block_size) for w in groups.windows if w is not None)
    return KvCapacity(per_token, full, _tokens(memory_bytes, per_token, block_size, groups.num_groups),
                      _tokens(memory_bytes, full, block_size), sliding)


def main(argv=None) -> None:
    from model.decoder import MoeCausalLM
    from model.dtypes import resolve_dtype
    from model.loader import resolve_source
    from model.parallel.config import ParallelConfig, RankLayout

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a preset name or a checkpoint directory")
    parser.add_argument("--memory-gib", type=float, default=40.0, help="KV-cache budget")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tensor-parallel", type=int, default=1, help="ranks; --memory-gib is one rank's budget")
    args = parser.parse_args(argv)
    config = resolve_source(args.model, random_weights=True)[0]
    model = None
    if args.tensor_parallel == 1:  # the plain model holds every head: its cache is one rank's only without TP
        with torch.device("meta"):
            model = MoeCausalLM(config)
    else:
        try:
            RankLayout.build(config, ParallelConfig(args.tensor_parallel), 0)  # heads it cannot split
        except ValueError as error:
            parser.error(str(error))
    dtype = resolve_dtype(args.dtype, "cpu")
    cap = kv_capacity(config, int(args.memory_gib * 2**30), dtype, args.block_size, model, args.tensor_parallel)
    ranks = f", per rank of {args.tensor_parallel}" if args.tensor_parallel > 1 else ""
    print(f"{config.name}: {args.memory_gib:g} GiB of {str(dtype).removeprefix('torch.')} KV cache, "
          f"{config.num_layers} layers{ranks}")
    print(f"  as cached:     {cap.bytes_per_token:>9,} B/token  {cap.tokens:>12,} tokens")
    print(f"  uncompressed:  {cap.uncompressed_bytes_per_token:>9,} B/token  {cap.uncompressed_tokens:>12,} tokens")
    print(f"  ratio:         {cap.ratio:.2f}x")
    if cap.sliding_blocks_per_sequence:
        print(f"  sliding-window layers: blocks behind the window are freed; each sequence also holds at most "
              f"{cap.sliding_blocks_per_sequence} blocks of its windows")


if __name__ == "__main__":
    main()
