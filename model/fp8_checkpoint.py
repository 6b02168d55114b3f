"""What a block-FP8 checkpoint holds, checked before any weight is read: which of our modules are FP8 in it.

A module is FP8 exactly when the checkpoint stores its weight(s) as float8_e4m3fn (every piece, for fused modules
such as qkv_proj or the experts); `modules_to_not_convert` must agree. Every FP8 tensor `X` needs `X_scale_inv`
(one scale per 128x128 block: [ceil(rows/128), ceil(cols/128)], with leading dimensions for 3-D experts tensors),
and every scale needs its FP8 tensor. Scales are read as float32 whatever their stored float dtype (vLLM copies them
into float32 parameters, so bf16 scales load there; bf16 and f16 upcast exactly). A scale is finite and >= 0: zero
is an all-zero block (fp8 x 0 = 0, e4m3fn having no infinity), as quantisers write for a block whose amax is 0.
Each problem is a CheckpointError naming the file and tensor. The FP8 bytes themselves are checked as they are
copied (model/weight_map.py `check_fp8_codes`: e4m3fn's NaN codes), not here: that is one read of every weight.
A module of ALWAYS_HIGH_PRECISION (MLA's kv_b_proj) stored in FP8 is checked alike but is no FP8 target: its weight
is dequantised at load (model/fp8_dequantized.py).
"""

import torch
from torch import nn

from model.checkpoint import CheckpointError, SafetensorsCheckpoint
from model.layers.linear import Linear
from model.layers.moe import Experts, Router
from model.quant_config import Fp8CheckpointConfig
from model.quantization import ALWAYS_HIGH_PRECISION
from model.weight_map import BLOCK, FP8_DTYPE_NAME, SCALE_SUFFIX, plan_loading, rename_keys

SCALE_DTYPES = ("F32", "BF16", "F16", "F64")  # read as float32 (an FP8 "scale" is some other format: refused)


def _where(checkpoint: SafetensorsCheckpoint, key: str) -> str:
    return f"tensor {key!r} in {checkpoint.tensors[key].file}"


def _check_scales(checkpoint: SafetensorsCheckpoint, quant: Fp8CheckpointConfig | None) -> None:
    tensors = checkpoint.tensors
    fp8 = [k for k, info in tensors.items() if info.dtype == FP8_DTYPE_NAME and not k.endswith(SCALE_SUFFIX)]
    if fp8 and not isinstance(quant, Fp8CheckpointConfig):
        declared = "has no quantization_config" if quant is None else "declares another quantization_config"
        raise CheckpointError(f"{_where(checkpoint, fp8[0])} is float8_e4m3fn, but config.json {declared} (block "
                              f"FP8 needs quant_method \"fp8\", weight_block_size [128, 128])")
    for key in fp8:
        info, scale_key = tensors[key], key + SCALE_SUFFIX
        if len(info.shape) < 2:
            raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn with shape {info.shape}: only "
                                  f"weight matrices can be FP8")
        if scale_key not in tensors:
            raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn but the checkpoint has no "
                                  f"{scale_key!r} (its float32 128x128 block scales)")
        want = (*info.shape[:-2], -(-info.shape[-2] // BLOCK), -(-info.shape[-1] // BLOCK))
        scale = tensors[scale_key]
        if scale.dtype not in SCALE_DTYPES or scale.shape != want:
            raise CheckpointError(f"{_where(checkpoint, scale_key)} is {scale.dtype} {list(scale.shape)}; the scales "
                                  f"of {key!r} {list(info.shape)} must be {list(want)} (one per 128x128 block), F32 "
                                  f"or another float dtype read as float32 ({', '.join(SCALE_DTYPES[1:])})")
        module = key.rsplit(".", 1)[0] if key.endswith(".weight") else key
        if quant.keeps_high_precision(module):
            raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn, but quantization_config."
                                  f"modules_to_not_convert lists {module!r} as high precision")
    for key in tensors:
        if key.endswith(SCALE_SUFFIX) and tensors.get(key[: -len(SCALE_SUFFIX)], None) is None:
            raise CheckpointError(f"{_where(checkpoint, key)} has no weight {key[: -len(SCALE_SUFFIX)]!r} to scale")
        if key.endswith(SCALE_SUFFIX) and tensors[key[: -len(SCALE_SUFFIX)]].dtype != FP8_DTYPE_NAME:
            raise CheckpointError(f"{_where(checkpoint, key)} scales {key[: -len(SCALE_SUFFIX)]!r}, which is "
                                  f"{tensors[key[: -len(SCALE_SUFFIX)]].dtype}, not float8_e4m3fn")
        if key.endswith((".input_scale", ".activation_scale")):
            raise CheckpointError(f"{_where(checkpoint, key)} is a static activation scale: only activation_scheme "
                                  f"\"dynamic\" is served")
    _check_scale_values(checkpoint, [key + SCALE_SUFFIX for key in fp8])


def _check_scale_values(checkpoint: SafetensorsCheckpoint, keys: list[str]) -> None:
    """Every block scale, as the float32 it is served as, finite and >= 0: an inf, NaN or negative one loads as a
    silently wrong block, and so does a float64 one that leaves float32's range (inf, or 0 from a non-zero value).
    The scales are ~1/16384 of the FP8 bytes, so reading them all at start-up is cheap."""
    for key, stored in checkpoint.read(keys):
        scale = stored.float()
        bad = ~torch.isfinite(scale) | (scale < 0) | ((scale == 0) & (stored != 0))
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise CheckpointError(f"{_where(checkpoint, key)} holds {int(bad.sum())} block scale(s) that are not "
                                  f"finite and >= 0 as float32 (e.g. {stored[first].item()} at {list(first)}); a "
                                  f"scale multiplies its 128x128 block (0: an all-zero block)")


def fp8_targets(plain: nn.Module, checkpoint: SafetensorsCheckpoint, renames, ignorable=()) -> list[str]:
    """Names of the modules of `plain` (the model before any transform, on any device) that the checkpoint stores
    in FP8; [] for a high-precision checkpoint. Raises CheckpointError for anything we cannot serve."""
    _check_scales(checkpoint, plain.config.quantization)
    scales = {k for k, orig in rename_keys(checkpoint.tensors, renames).items() if orig.endswith(SCALE_SUFFIX)}
    plan = plan_loading(plain, checkpoint, renames, {*ignorable, *scales}, check_dtypes=False)
    owner = {id(p): (name.rpartition(".")[0], name) for name, p in plain.named_parameters()}
    fp8_pieces: dict[str, list[tuple[str, bool]]] = {}  # module -> [(checkpoint key, stored fp8)] of its weights
    for param, piece, key in plan:
        module_name, param_name = owner[id(param)]
        is_fp8 = checkpoint.tensors[key].dtype == FP8_DTYPE_NAME
        module = plain.get_submodule(module_name)
        # grouped routing reads the router's weight itself (x·Wᵀ in float32, model/layers/moe.py), not through the
        # module, so an FP8 twin (weight + scales) cannot stand in for it
        if is_fp8 and isinstance(module, Router) and plain.config.grouped_routing:
            what = ("e_score_correction_bias" if module.e_score_correction_bias is not None else
                    "grouped routing (scoring_func, n_group or routed_scaling_factor)")
            raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn, but a router with {what} is served "
                                  f"in high precision only (its float32 scores choose the experts; DeepSeek and "
                                  f"GLM-4.5 FP8 checkpoints keep it in bf16)")
        if is_fp8 and piece.convert is not None:  # e.g. gpt-oss's transposed, gate/up-interleaved experts
            raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn in a layout converted at load "
                                  f"(transposed or interleaved), which its 128x128 block scales cannot follow: "
                                  f"store it in high precision")
        # biases: a Linear's `.bias`, the experts' `*_proj_bias` (gpt-oss), the router's `e_score_correction_bias`
        if param_name.endswith((".bias", "_bias")) or not isinstance(module, (Linear, Experts)):
            if is_fp8:
                raise CheckpointError(f"{_where(checkpoint, key)} is float8_e4m3fn, but {param_name} is served in "
                                      f"high precision only (FP8 is for linear and expert weights)")
            continue
        fp8_pieces.setdefault(module_name, []).append((key, is_fp8))
    targets = []
    for module_name, pieces in fp8_pieces.items():
        kinds = {is_fp8 for _, is_fp8 in pieces}
        if kinds == {True, False}:
            fp8_key = next(k for k, f in pieces if f)
            hp_key = next(k for k, f in pieces if not f)
            raise CheckpointError(f"{module_name} is fused from {_where(checkpoint, fp8_key)} (float8_e4m3fn) and "
                                  f"{_where(checkpoint, hp_key)} ({checkpoint.tensors[hp_key].dtype}): its parts "
                                  f"must share one precision")
        if kinds == {True} and module_name.rsplit(".", 1)[-1] not in ALWAYS_HIGH_PRECISION:
            if module_name == "lm_head":
                raise CheckpointError(f"{_where(checkpoint, pieces[0][0])}: an FP8 LM head is not supported (list "
                                      f"lm_head in modules_to_not_convert and store it in bf16)")
            _check_divisible(plain.get_submodule(module_name), module_name, checkpoint, pieces[0][0])
            targets.append(module_name)
    return targets


def _check_divisible(module: nn.Module, name: str, checkpoint: SafetensorsCheckpoint, key: str) -> None:
    """FP8 activations are quantised per 128 columns of K, so every K (and the experts' H and I) must be whole
    blocks."""
    if isinstance(module, Experts):
        hidden, inter = module.down_proj.shape[1:]
        sizes = {"hidden size H": hidden, "expert intermediate size I": inter}
    else:
        sizes = {"input size K": module.in_features}
    for what, n in sizes.items():
        if n % BLOCK:
            raise CheckpointError(f"{_where(checkpoint, key)}: FP8 {name} has {what} = {n}, not a multiple of "
                                  f"{BLOCK} (activations are quantised per 128 columns)")
