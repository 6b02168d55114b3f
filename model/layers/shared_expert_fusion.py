"""Shared experts run inside the routed experts op (on by default; `STATICMOE_FUSE_SHARED_EXPERTS=0` turns it off).
Measured on an H100 (deepseek-v2-lite, bench_engine, benchmarks/NOTES.md "Session 18"): 252 → 267 tok/s at batch 1,
3245 → 3354 at batch 64.

DeepSeek, GLM-4.5 and Qwen2-MoE send every token through a dense SwiGLU MLP beside the routed experts: three more
launches per MoE layer (GEMM, activation, GEMM), which dominate little but cost their launch gaps in a decode step.
A SwiGLU MLP of intermediate size S·I is, column block by column block, the sum of S SwiGLU MLPs of size I (the
activation acts on each intermediate column alone). So the shared MLP becomes S extra experts of the routed width,
appended to the experts' weights, and every token gets S extra slots routed to them, with weight 1 (DeepSeek, GLM)
or the token's sigmoid gate (Qwen2-MoE): the one `fused_moe` launch then streams the shared weights with the routed
ones, and its deterministic combine adds them. FP8 weights move with their 128x128 block scales (I a multiple of
128). The extra experts' tokens are counted in `expert_load` past the routed experts and left out of the metrics.
Beside the two-launch decode MoE it is untimed and likely slower: that path streams each slot's expert on its own,
so the shared weights once per token. No supported shared-expert model has experts small enough for that path's
default (`triton_decode_moe.AUTO_MAX_EXPERT_ELEMENTS`); `STATICMOE_DECODE_MOE=1` forces the pairing.

Only for one-rank models (expert parallelism shards the experts, and the shared ones belong to every rank), and
blocks whose experts have no biases and are not padded.
"""

import logging

import torch
from torch import nn

from model.kernels.fp8 import FP8_BLOCK
from model.kernels.knobs import env_switch
from model.layers.fp8 import Fp8Experts, Fp8Linear
from model.layers.linear import Linear
from model.layers.moe import SparseMoeBlock

logger = logging.getLogger(__name__)


def enabled() -> bool:
    """On unless `STATICMOE_FUSE_SHARED_EXPERTS=0`."""
    return env_switch("STATICMOE_FUSE_SHARED_EXPERTS", default=True)


def _slots(block: SparseMoeBlock) -> int | None:
    """How many routed-width experts the block's shared MLP splits into; None where it cannot be fused."""
    shared, experts = block.shared_expert, block.experts
    if shared is None or experts.gate_up_proj_bias is not None or getattr(experts, "is_padded", False):
        return None
    inter, shared_inter = block.intermediate_size, shared.down_proj.in_features
    if shared_inter % inter:
        return None
    fp8 = isinstance(experts, Fp8Experts)
    linears = (shared.gate_up_proj, shared.down_proj)
    if fp8 != all(isinstance(m, Fp8Linear) for m in linears) or not all(isinstance(m, (Linear, Fp8Linear))
                                                                        for m in linears):
        return None  # one precision for the routed and the shared weights
    if any(m.bias is not None for m in linears) or (fp8 and inter % FP8_BLOCK):
        return None
    return shared_inter // inter


def _split(weight: torch.Tensor, rows_per_slot: int, slots: int, shared_rows: int) -> list[torch.Tensor]:
    """Slot s of a gate_up weight (or its block scales): gate rows [s·r, (s+1)·r) then up rows from `shared_rows`
    on — the layout of one expert's gate_up_proj."""
    return [torch.cat((weight[s * rows_per_slot:(s + 1) * rows_per_slot],
                       weight[shared_rows + s * rows_per_slot: shared_rows + (s + 1) * rows_per_slot]))
            for s in range(slots)]


def _columns(weight: torch.Tensor, cols_per_slot: int, slots: int) -> list[torch.Tensor]:
    return [weight[:, s * cols_per_slot:(s + 1) * cols_per_slot] for s in range(slots)]


@torch.no_grad()
def fuse_block(block: SparseMoeBlock) -> bool:
    """Move the block's shared MLP into its experts (see the module doc); False where it cannot be fused."""
    slots = _slots(block)
    if slots is None:
        return False
    experts, shared = block.experts, block.shared_expert
    inter, shared_inter = block.intermediate_size, slots * block.intermediate_size
    gate_up, down = shared.gate_up_proj, shared.down_proj
    w13 = torch.stack(_split(gate_up.weight, inter, slots, shared_inter))  # [S, 2I, H]
    w2 = torch.stack(_columns(down.weight, inter, slots))  # [S, H, I]
    experts.gate_up_proj = nn.Parameter(torch.cat((experts.gate_up_proj, w13.to(experts.gate_up_proj.dtype))),
                                        requires_grad=False)
    experts.down_proj = nn.Parameter(torch.cat((experts.down_proj, w2.to(experts.down_proj.dtype))),
                                     requires_grad=False)
    if isinstance(experts, Fp8Experts):
        b = FP8_BLOCK
        s13 = torch.stack(_split(gate_up.weight_scale_inv, inter // b, slots, shared_inter // b))  # [S, 2I/b, H/b]
        s2 = torch.stack(_columns(down.weight_scale_inv, inter // b, slots))  # [S, H/b, I/b]
        experts.gate_up_proj_scale_inv = nn.Parameter(torch.cat((experts.gate_up_proj_scale_inv, s13)),
                                                      requires_grad=False)
        experts.down_proj_scale_inv = nn.Parameter(torch.cat((experts.down_proj_scale_inv, s2)),
                                                   requires_grad=False)
    experts.expert_load = torch.zeros(block.num_experts + slots, dtype=torch.int64, device=experts.expert_load.device)
    device = experts.expert_load.device
    block.register_buffer("shared_slot_ids", torch.arange(block.num_experts, block.num_experts + slots,
                                                          dtype=torch.int32, device=device)[None], persistent=False)
    block.register_buffer("shared_slot_ones", torch.ones(1, slots, dtype=torch.float32, device=device),
                          persistent=False)
    if hasattr(experts, "num_experts"):  # Fp8Experts keeps its stored count (the block's stays the routed one)
        experts.num_experts += slots
    block.shared_expert = None
    block.fused_shared_slots = slots
    return True


def fuse_shared_experts(model: nn.Module) -> int:
    """Fuse every block that can be; returns how many were."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]  # listed first: fusing edits the tree
    fused = 0
    for block in blocks:
        fused += fuse_block(block)
        if block.experts.expert_load.is_cuda:
            # each block's concatenation is a little larger than the tensors it frees, so the caching allocator
            # could not reuse them: hand them back (GLM-4.5-Air in FP8 fills ~108 of an H200's 139 GB)
            torch.cuda.empty_cache()
    if fused:
        logger.info("shared experts run inside fused_moe in %d MoE layers (STATICMOE_FUSE_SHARED_EXPERTS)", fused)
    return fused


def unfused_named_parameters(model: nn.Module):
    """(name, tensor) of every parameter as the model had it before `fuse_shared_experts`: the experts' tensors
    sliced back to the routed experts (views) and each fused block's shared MLP rebuilt from the extra experts
    (copies: gate rows of every slot, then up rows; down's columns slot by slot). For tools that need the original
    layout, such as bench_engine's transformers model on the engine's weights."""
    fused = {name: block for name, block in model.named_modules()
             if isinstance(block, SparseMoeBlock) and block.fused_shared_slots}
    expert_tensors = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        block = fused.get(owner.removesuffix(".experts")) if owner.endswith(".experts") else None
        yield name, (param[: block.num_experts] if block is not None and leaf in expert_tensors else param)
    for name, block in fused.items():
        experts, routed = block.experts, block.num_experts
        pairs = [("weight", experts.gate_up_proj, experts.down_proj)]
        if isinstance(experts, Fp8Experts):
            pairs.append(("weight_scale_inv", experts.gate_up_proj_scale_inv, experts.down_proj_scale_inv))
        for leaf, w13, w2 in pairs:
            extra13, extra2 = w13[routed:], w2[routed:]  # [S, 2r, c], [S, c, r]
            half = extra13.shape[1] // 2
            gate_up = torch.cat((extra13[:, :half].flatten(0, 1), extra13[:, half:].flatten(0, 1)))
            yield f"{name}.shared_expert.gate_up_proj.{leaf}", gate_up
            yield f"{name}.shared_expert.down_proj.{leaf}", torch.cat(tuple(extra2), dim=1)
