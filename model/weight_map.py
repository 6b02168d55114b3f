"""Which checkpoint tensors fill which model parameter, and where inside it.

Our parameters fuse some HF tensors: qkv_proj = [q_proj; k_proj; v_proj], a dense MLP's gate_up_proj =
[gate_proj; up_proj], and the routed experts are 3-D: gate_up_proj [E, 2I, H] and down_proj [E, H, I]. Experts load
either from those fused 3-D tensors (as transformers 5 holds them) or from per-expert 2-D keys (as
`save_pretrained` and the published checkpoints store them). gpt-oss stores its experts transposed with gate and
up interleaved (`Family.expert_layout == "gpt_oss"`); those pieces carry a `convert` that turns the stored tensor
into our layout as it is copied.

FP8 parameters (model/layers/fp8.py) come with a block-scale parameter `<weight>_scale_inv`, filled from the
checkpoint's scales of the same pieces (`scale_sources`: a fused piece must start and end on a 128-row block), or,
when a high-precision checkpoint is quantised at load (`QuantizeAtLoad`), made from the assembled weight. Each FP8
tensor is checked for NaN codes as it is copied (`check_fp8_codes`).

Tied embeddings (`tie_word_embeddings`): the one parameter loads from `model.embed_tokens.weight`, or from
`lm_head.weight` when the checkpoint stores only that name (tied the other way, as transformers' tie_weights does).
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from model.checkpoint import CheckpointError, SafetensorsCheckpoint

logger = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights we need.
IGNORED_KEYS = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclass(frozen=True)
class Piece:
    key: str  # checkpoint key (after the family's renames)
    index: tuple  # where it lands in the parameter; () = the whole parameter
    shape: tuple[int, ...]  # the shape the checkpoint tensor must have
    convert: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)  # stored -> ours
    export: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)  # ours -> stored


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss's gate/up interleaving (gate at even, up at odd indices of `dim`) -> all gates, then all ups."""
    index = [slice(None)] * t.dim()
    gates, ups = list(index), list(index)
    gates[dim], ups[dim] = slice(0, None, 2), slice(1, None, 2)
    return torch.cat((t[tuple(gates)], t[tuple(ups)]), dim=dim)


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `deinterleave`: all gates then all ups along `dim` -> gate, up, gate, up, ..."""
    gates, ups = t.chunk(2, dim=dim)
    return torch.stack((gates, ups), dim=dim + 1).flatten(dim, dim + 1)


def _gpt_oss_experts(name: str, shape: tuple[int, ...]) -> list[list[Piece]] | None:
    """gpt-oss stores gate_up_proj [E, H, 2I] (columns gate, up, gate, up, ...), its bias [E, 2I] likewise, and
    down_proj [E, I, H] (transformers' GptOssExperts, which computes x @ W); ours are [E, 2I, H] gate rows then up
    rows, [E, 2I], [E, H, I]."""
    if re.fullmatch(r".*\.experts\.gate_up_proj", name):
        experts, two_inter, hidden = shape
        return [[Piece(name, (), (experts, hidden, two_inter), lambda t: deinterleave(t.transpose(1, 2), 1),
                       lambda t: interleave(t, 1).transpose(1, 2))]]
    if re.fullmatch(r".*\.experts\.gate_up_proj_bias", name):
        return [[Piece(name, (), shape, lambda t: deinterleave(t, 1), lambda t: interleave(t, 1))]]
    if re.fullmatch(r".*\.experts\.down_proj", name):
        experts, hidden, inter = shape
        return [[Piece(name, (), (experts, inter, hidden), lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2))]]
    return None


def _rows(base: str, names: list[str], sizes: list[int], suffix: str, cols: tuple[int, ...]) -> list[Piece]:
    pieces, start = [], 0
    for name, size in zip(names, sizes):
        pieces.append(Piece(f"{base}{name}.{suffix}", (slice(start, start + size),), (size, *cols)))
        start += size
    return pieces


def parameter_sources(name: str, shape: tuple[int, ...], q_size: int, kv_size: int,
                      expert_layout: str = "concatenated") -> list[list[Piece]]:
    """Alternative ways to assemble parameter `name`; the loader takes the first whose keys all exist."""
    whole = [Piece(name, (), shape)]
    if expert_layout == "gpt_oss" and (converted := _gpt_oss_experts(name, shape)) is not None:
        return converted
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


SCALE_SUFFIX = "_scale_inv"
BLOCK = 128
FP8_DTYPE_NAME = "F8_E4M3"  # safetensors' name of float8_e4m3fn
EMBEDDINGS, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # our names (after the family's renames)


def check_fp8_codes(tensor: torch.Tensor, key: str, file) -> None:
    """Raise CheckpointError naming `key` when float8_e4m3fn `tensor` holds a NaN code. e4m3fn has no infinity; its
    only non-finite bit patterns are S.1111.111 (0x7F, 0xFF). Casts saturate at ±448, so a quantiser writes them only
    from a NaN (0 / 0 for an all-zero block under a zero scale, say), and one makes every output row whose input
    meets it NaN, whatever the block's scale. One pass over the bytes, on their device."""
    nan = torch.bitwise_and(tensor.view(torch.uint8), 0x7F).eq_(0x7F)
    if nan.any():
        first = [int(i) for i in nan.nonzero()[0]]
        raise CheckpointError(f"tensor {key!r} in {file} holds {int(nan.count_nonzero())} NaN float8_e4m3fn "
                              f"value(s) (byte 0x7F or 0xFF), the first at {first}")


def _scale_key(key: str) -> str:
    return key + SCALE_SUFFIX  # "x.weight" -> "x.weight_scale_inv", "x.experts.gate_up_proj" -> "..._scale_inv"


def scale_sources(weight_pieces: list[Piece], weight_shape: tuple[int, ...]) -> list[Piece]:
    """The block-scale pieces that fill `<weight>_scale_inv` when `weight_pieces` fill the FP8 weight: same keys +
    `_scale_inv`, row slices in 128-row blocks. Raises CheckpointError when a piece does not start and end on a
    block boundary (its scales would share blocks with its neighbour's)."""
    blocks = lambda n: -(-n // BLOCK)  # noqa: E731
    pieces = []
    for piece in weight_pieces:
        index = []
        for dim, part in enumerate(piece.index):
            if isinstance(part, slice):
                full = weight_shape[dim]
                if part.start % BLOCK or (part.stop % BLOCK and part.stop != full):
                    raise CheckpointError(f"tensor {piece.key!r} fills rows [{part.start}, {part.stop}) of a fused FP8 "
                                          f"weight: block-FP8 loading needs each fused part to be a multiple of "
                                          f"{BLOCK} rows")
                part = slice(part.start // BLOCK, blocks(part.stop))
            index.append(part)
        shape = (*piece.shape[:-2], blocks(piece.shape[-2]), blocks(piece.shape[-1]))
        pieces.append(Piece(_scale_key(piece.key), tuple(index), shape))
    return pieces


@dataclass
class QuantizeAtLoad:
    """FP8 parameters filled from high-precision checkpoint tensors: each is assembled in `dtype` on its device from
    all of its pieces, then `quantize(name, value)` writes it and its scales; the scales are not read from the
    checkpoint. At most a few parameters are staged at once (those whose pieces span files)."""
    params: set[str]
    dtype: torch.dtype
    quantize: Callable[[str, torch.Tensor], None]
    scales: set[str] = field(init=False)

    def __post_init__(self):
        self.scales = {name + SCALE_SUFFIX for name in self.params}


def logical_shape(model: nn.Module, name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape the checkpoint gives for parameter `name`: its own, or the unpadded one of an FP8 weight padded to
    whole 128-blocks (model/layers/fp8.py `Fp8Experts.logical_shape`)."""
    prefix, _, leaf = name.rpartition(".")
    owner = model.get_submodule(prefix) if prefix else model
    shape = owner.logical_shape(leaf) if hasattr(owner, "logical_shape") else None
    return tuple(shape or param.shape)


def _alternatives(model: nn.Module, name: str, shape: tuple[int, ...], q_size: int, kv_size: int):
    from model.families import FAMILIES  # families -> config; imported here to keep weight_map config-free

    family = FAMILIES.get(model.config.model_type)
    layout = family.expert_layout if family is not None else "concatenated"
    if name == EMBEDDINGS and model.config.tie_word_embeddings:
        return [[Piece(EMBEDDINGS, (), shape)], [Piece(HEAD, (), shape)]]
    if name.endswith(SCALE_SUFFIX):
        weight = name[: -len(SCALE_SUFFIX)]
        weight_shape = tuple(model.get_parameter(weight).shape)
        return [scale_sources(alt, weight_shape)
                for alt in parameter_sources(weight, weight_shape, q_size, kv_size, layout)]
    return parameter_sources(name, shape, q_size, kv_size, layout)


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


def untie_distinct_head(config, checkpoint: SafetensorsCheckpoint | None, renames):
    """`config`, untied when it sets tie_word_embeddings but the checkpoint also stores an `lm_head.weight` that
    differs from the embeddings: transformers then keeps both (with a warning), so the stored head is served.
    Reads the two tensors, only in that case."""
    if checkpoint is None or not config.tie_word_embeddings:
        return config
    original = rename_keys(checkpoint.tensors, renames)  # our key -> checkpoint key
    head, embed = original.get(HEAD), original.get(EMBEDDINGS)
    if head is None or embed is None:
        return config
    stored = dict(checkpoint.read([head, embed]))
    if stored[head].shape == stored[embed].shape and torch.equal(stored[head].float(), stored[embed].float()):
        return config  # a copy of the embeddings (as .bin-converted checkpoints store it): tied
    logger.warning("config.json sets tie_word_embeddings, but %r in %s differs from %r: not tied, the stored head "
                   "is used (as transformers does)", head, checkpoint.tensors[head].file, embed)
    return config.replace(tie_word_embeddings=False)


def unused_keys(config, checkpoint: SafetensorsCheckpoint | None, renames) -> set[str]:
    """Checkpoint keys (after renames) left unloaded on purpose: a tied LM head's copy (unless it is the only copy),
    and the multi-token-prediction layers of DeepSeek-V3 and GLM-4.5 (`num_nextn_predict_layers`, stored as layers
    num_hidden_layers, ... after the decoder's; a decode step does not use them, speculative decoding could later)."""
    keys = {HEAD} if config.tie_word_embeddings else set()
    if checkpoint is not None and config.mtp_layers:
        prefixes = tuple(f"model.layers.{config.num_layers + i}." for i in range(config.mtp_layers))
        keys |= {k for k in rename_keys(checkpoint.tensors, renames) if k.startswith(prefixes)}
    return keys


def plan_loading(
    model: nn.Module, checkpoint: SafetensorsCheckpoint, renames, ignorable=(), made=(), check_dtypes: bool = True
) -> list[tuple[torch.nn.Parameter, Piece, str]]:
    """Match every parameter (but those in `made`, produced at load) to checkpoint tensors; raise CheckpointError
    for missing, extra or mis-shaped keys, and (`check_dtypes`) for an FP8 tensor meant for a high-precision
    parameter or the reverse. Returns (parameter, piece, original checkpoint key) triples in checkpoint order."""
    keys = rename_keys(checkpoint.tensors, renames)
    config = model.config
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    quantized_here = {name[: -len(SCALE_SUFFIX)] for name in made}
    plan, used = [], set()
    for name, param in model.named_parameters():
        if name in made:
            continue
        stored_fp8 = param.dtype == torch.float8_e4m3fn and name not in quantized_here
        alternatives = _alternatives(model, name, logical_shape(model, name, param), q_size, kv_size)
        chosen = next((alt for alt in alternatives if all(p.key in keys for p in alt)), None)
        if chosen is None:
            closest = max(alternatives, key=lambda alt: sum(p.key in keys for p in alt))
            missing = next(p.key for p in closest if p.key not in keys)
            tied = f" nor {HEAD!r} (tie_word_embeddings)" if name == EMBEDDINGS and config.tie_word_embeddings else ""
            raise CheckpointError(f"checkpoint {checkpoint.directory} has no tensor {missing!r}{tied} "
                                  f"(needed for parameter {name} {tuple(param.shape)})")
        for piece in chosen:
            info = checkpoint.tensors[keys[piece.key]]
            if info.shape != piece.shape:
                raise CheckpointError(f"tensor {keys[piece.key]!r} in {info.file} has shape {info.shape}, "
                                      f"expected {piece.shape}")
            # a cast would silently drop or invent block scales
            if check_dtypes and (info.dtype == FP8_DTYPE_NAME) != stored_fp8:
                raise CheckpointError(f"tensor {keys[piece.key]!r} in {info.file} is {info.dtype} but parameter "
                                      f"{name} is {str(param.dtype).removeprefix('torch.')}")
            plan.append((param, piece, keys[piece.key]))
            used.add(piece.key)
    extra = [k for k in keys if k not in used and k not in ignorable and not any(p.match(k) for p in IGNORED_KEYS)]
    if extra:
        shown = ", ".join(f"{keys[k]!r} in {checkpoint.tensors[keys[k]].file.name}" for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint.directory} has tensors the model does not use: {shown}{more}")
    return plan


@torch.no_grad()
def load_weights(model: nn.Module, checkpoint: SafetensorsCheckpoint, renames=(), ignorable=(),
                 quantize_at_load: QuantizeAtLoad | None = None) -> None:
    """Copy (and cast) every checkpoint tensor into its slice of the model's parameters; FP8 parameters of
    `quantize_at_load` are assembled in high precision, then quantised."""
    made = quantize_at_load.scales if quantize_at_load else ()
    plan = plan_loading(model, checkpoint, renames, ignorable, made)
    targets = {original: (param, piece) for param, piece, original in plan}
    names = {id(p): name for name, p in model.named_parameters()}
    left = {}  # staged parameter name -> pieces still to come
    for param, _, _ in plan:
        if quantize_at_load and names[id(param)] in quantize_at_load.params:
            left[names[id(param)]] = left.get(names[id(param)], 0) + 1
    staged: dict[str, torch.Tensor] = {}
    for original, tensor in checkpoint.read(list(targets)):
        param, piece = targets[original]
        name = names[id(param)]
        if piece.convert is not None:
            tensor = piece.convert(tensor)
        if name not in left:
            target = param.data[piece.index]
            target.copy_(tensor)
            if tensor.dtype == torch.float8_e4m3fn:  # checked on the device, where the bytes now are
                check_fp8_codes(target, original, checkpoint.tensors[original].file)
            continue
        if name not in staged:
            staged[name] = torch.empty(logical_shape(model, name, param), dtype=quantize_at_load.dtype,
                                       device=param.device)
        staged[name][piece.index].copy_(tensor)
        left[name] -= 1
        if left[name] == 0:
            quantize_at_load.quantize(name, staged.pop(name))
