"""Which checkpoint tensors fill which model parameter, and where inside it.

Our parameters fuse some HF tensors: qkv_proj = [q_proj; k_proj; v_proj], a dense MLP's gate_up_proj =
[gate_proj; up_proj], and the routed experts are 3-D: gate_up_proj [E, 2I, H] and down_proj [E, H, I]. Experts load
either from those fused 3-D tensors (as transformers 5 holds them) or from per-expert 2-D keys (as
`save_pretrained` and the published checkpoints store them).
"""

import re
from dataclasses import dataclass

import torch
from torch import nn

from model.checkpoint import CheckpointError, SafetensorsCheckpoint

# Checkpoint tensors that carry no weights we need.
IGNORED_KEYS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclass(frozen=True)
class Piece:
    key: str  # checkpoint key (after the family's renames)
    index: tuple  # where it lands in the parameter; () = the whole parameter
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have


def _rows(base: str, names: list[str], sizes: list[int], suffix: str, cols: tuple[int, ...]) -> list[Piece]:
    pieces, start = [], 0
    for name, size in zip(names, sizes):
        pieces.append(Piece(f"{base}{name}.{suffix}", (slice(start, start + size),), (size, *cols)))
        start += size
    return pieces


def parameter_sources(name: str, shape: tuple[int, ...], q_size: int, kv_size: int) -> list[list[Piece]]:
    """Alternative ways to assemble parameter `name`; the loader takes the first whose keys all exist."""
    whole = [Piece(name, (), shape)]
    if m := re.fullmatch(r"(.*\.)qkv_proj\.(weight|bias)", name):
        return [_rows(m[1], ["q_proj", "k_proj", "v_proj"], [q_size, kv_size, kv_size], m[2], shape[1:])]
    if m := re.fullmatch(r"(.*\.)gate_up_proj\.weight", name):  # dense MLP or shared expert
        inter = shape[0] // 2
        return [_rows(m[1], ["gate_proj", "up_proj"], [inter, inter], "weight", shape[1:])]
    if m := re.fullmatch(r"(.*\.experts\.)gate_up_proj", name):
        experts, two_inter, hidden = shape
        inter = two_inter // 2
        per_expert = []
        for e in range(experts):
            per_expert.append(Piece(f"{m[1]}{e}.gate_proj.weight", (e, slice(0, inter)), (inter, hidden)))
            per_expert.append(Piece(f"{m[1]}{e}.up_proj.weight", (e, slice(inter, two_inter)), (inter, hidden)))
        return [whole, per_expert]
    if m := re.fullmatch(r"(.*\.experts\.)down_proj", name):
        return [whole, [Piece(f"{m[1]}{e}.down_proj.weight", (e,), shape[1:]) for e in range(shape[0])]]
    return [whole]


def rename_keys(keys, renames: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """{our key: checkpoint key} after applying the family's (regex, replacement) renames."""
    mapping = {}
    for original in keys:
        key = original
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if key in mapping:
            raise CheckpointError(f"checkpoint keys {mapping[key]!r} and {original!r} both map to {key!r}")
        mapping[key] = original
    return mapping


def plan_loading(
    model: nn.Module, checkpoint: SafetensorsCheckpoint, renames, ignorable=()
) -> list[tuple[torch.nn.Parameter, Piece, str]]:
    """Match every parameter to checkpoint tensors; raise CheckpointError for missing, extra or mis-shaped keys.
    Returns (parameter, piece, original checkpoint key) triples in checkpoint order."""
    keys = rename_keys(checkpoint.tensors, renames)
    config = model.config
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    plan, used = [], set()
    for name, param in model.named_parameters():
        alternatives = parameter_sources(name, tuple(param.shape), q_size, kv_size)
        chosen = next((alt for alt in alternatives if all(p.key in keys for p in alt)), None)
        if chosen is None:
            closest = max(alternatives, key=lambda alt: sum(p.key in keys for p in alt))
            missing = next(p.key for p in closest if p.key not in keys)
            raise CheckpointError(f"checkpoint {checkpoint.directory} has no tensor {missing!r} "
                                  f"(needed for parameter {name} {tuple(param.shape)})")
        for piece in chosen:
            info = checkpoint.tensors[keys[piece.key]]
            if info.shape != piece.shape:
                raise CheckpointError(f"tensor {keys[piece.key]!r} in {info.file} has shape {info.shape}, "
                                      f"expected {piece.shape}")
            plan.append((param, piece, keys[piece.key]))
            used.add(piece.key)
    extra = [k for k in keys if k not in used and k not in ignorable and not any(p.match(k) for p in IGNORED_KEYS)]
    if extra:
        shown = ", ".join(f"{keys[k]!r} in {checkpoint.tensors[keys[k]].file.name}" for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint.directory} has tensors the model does not use: {shown}{more}")
    return plan


@torch.no_grad()
def load_weights(model: nn.Module, checkpoint: SafetensorsCheckpoint, renames=(), ignorable=()) -> None:
    """Copy (and cast) every checkpoint tensor into its slice of the model's parameters."""
    plan = plan_loading(model, checkpoint, renames, ignorable)
    targets = {original: (param, piece) for param, piece, original in plan}
    for original, tensor in checkpoint.read(list(targets)):
        param, piece = targets[original]
        param.data[piece.index].copy_(tensor)
