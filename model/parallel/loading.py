"""Fill one rank's shard: from a checkpoint, reading only the rank's slices of each tensor, or with the same seeded
random weights the single-rank loader would draw (so a preset is the same model at any parallelism).

The checkpoint is matched against the *global* model (the plain model on the meta device) by the single-rank code
(`plan_loading`), so every missing, extra or mis-shaped tensor is reported exactly as without parallelism.
"""

import logging
from dataclasses import dataclass

import torch

from model.checkpoint import SafetensorsCheckpoint
from model.families import FAMILIES
from model.loader import resolve_source
from model.parallel.comm import Comm
from model.parallel.config import ParallelConfig, RankLayout
from model.parallel.model import ParallelCausalLM, build_parallel_model, meta_model
from model.parallel.sharding import regions
from model.quant_config import Fp8CheckpointConfig
from model.weight_map import plan_loading, untie_distinct_head, unused_keys

logger = logging.getLogger(__name__)


@dataclass
class ShardLoadStats:
    bytes_read: int  # checkpoint bytes this rank read
    tensors_touched: int  # checkpoint tensors it read any part of
    tensors_total: int


@torch.no_grad()
def load_shard(model: ParallelCausalLM, checkpoint: SafetensorsCheckpoint) -> ShardLoadStats:
    config = model.config
    global_model = meta_model(config)
    renames = FAMILIES[config.model_type].checkpoint_renames
    plan = plan_loading(global_model, checkpoint, renames, unused_keys(config, checkpoint, renames))
    names = {id(p): name for name, p in global_model.named_parameters()}
    local = dict(model.lm.named_parameters())
    for name, param in local.items():
        if model.spec(name).padded:
            param.zero_()  # vocabulary rows past the end
    requests, targets = [], []
    for global_param, piece, key in plan:
        name = names[id(global_param)]
        for src, dst in regions(model.spec(name), piece.index, piece.shape):
            requests.append((key, src))
            targets.append((local[name], dst))
    nbytes = 0
    for position, tensor in checkpoint.read_slices(requests):
        param, dst = targets[position]
        param.data[dst].copy_(tensor)
        nbytes += tensor.numel() * tensor.element_size()
    return ShardLoadStats(nbytes, len({key for key, _ in requests}), len(checkpoint.tensors))


@torch.no_grad()
def init_random_shard(model: ParallelCausalLM, seed: int = 0) -> None:
    """`model.loader.init_random_weights` of the global model, restricted to this rank: each matrix is drawn whole
    from the same per-parameter generator (one global parameter at a time in memory) and the rank keeps its part."""
    std = model.config.initializer_range
    local = dict(model.lm.named_parameters())
    for index, (name, global_param) in enumerate(meta_model(model.config).named_parameters()):
        param, spec = local[name], model.spec(name)
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
        whole = torch.empty(spec.global_shape, dtype=param.dtype, device=param.device)
        whole.normal_(0.0, std, generator=generator)
        if spec.padded:
            param.zero_()
        for src, dst in regions(spec, (), spec.global_shape):
            param[dst].copy_(whole[src])
        del whole


def load_parallel_model(source: str, parallel: ParallelConfig, rank: int, comm: Comm, *, random_weights: bool,
                        dtype: torch.dtype, device: torch.device, seed: int = 0, agree_min=None):
    """(rank's ParallelCausalLM, tokenizer, ShardLoadStats | None) for a `load_model` source."""
    config, tokenizer, directory, random_weights = resolve_source(source, random_weights)
    if isinstance(config.quantization, Fp8CheckpointConfig):
        raise ValueError(f"{source} is a block-FP8 checkpoint: FP8 runs on one GPU only (no tensor or expert "
                         f"parallelism yet)")
    checkpoint = None if random_weights else SafetensorsCheckpoint(directory)
    config = untie_distinct_head(config, checkpoint, FAMILIES[config.model_type].checkpoint_renames)
    layout = RankLayout.build(config, parallel, rank)
    model = build_parallel_model(config, layout, comm, dtype, device, agree_min)
    stats = None
    if checkpoint is None:
        init_random_shard(model, seed)
    else:
        stats = load_shard(model, checkpoint)
        logger.info("rank %d read %.1f MiB of its shard from %d of %d checkpoint tensors", rank,
                    stats.bytes_read / 2**20, stats.tensors_touched, stats.tensors_total)
    return model, tokenizer, stats
