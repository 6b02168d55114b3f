"""FP8 as a transform of the plain model (gpt-fast's way): `apply_fp8(model, targets)` swaps the named `Linear` and
`Experts` modules for their FP8 twins (model/layers/fp8.py); the decoder itself has no FP8 branch.

- On the meta device (how the loader uses it) the twins are empty, to be filled from a block-FP8 checkpoint or by
  `quantize_parameter` as high-precision weights arrive one parameter at a time; so no full-precision copy of the
  model ever exists on the device.
- On a model with weights (tests, tools) each target's weights are quantised into its twin on the spot.

What `--quantization fp8` quantises (`online_targets`): the routed experts, attention projections, dense MLPs and
shared experts — every GEMM whose weights a decode step streams (but a linear whose K is not whole 128-blocks, e.g.
GLM-4.5-Air's dense down projection or gpt-oss's q/k/v, stays as it is). The router, the shared-expert gate (tiny,
and the routing decision is sensitive), embeddings and the LM head stay in high precision, as DeepSeek-V3 and Qwen3-FP8 ship
them. MLA's kv_b_proj is never FP8 (ALWAYS_HIGH_PRECISION; an FP8 checkpoint's is dequantised at load,
model/fp8_dequantized.py). Quantisation is per 128x128 block (`model.kernels.fp8.quantize_fp8_blocks`, the
checkpoints' format).
"""

import logging

import torch
from torch import nn

from model.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, quantize_fp8_blocks
from model.kernels.fp8_linear import block_scaled_mm_supported
from model.layers.fp8 import Fp8Experts, Fp8Linear
from model.layers.linear import Linear
from model.layers.moe import Experts

logger = logging.getLogger(__name__)
SCALE_SUFFIX = "_scale_inv"
HIGH_PRECISION_LINEARS = ("gate", "shared_expert_gate", "lm_head")  # last name component of linears kept as they are
# Linears whose weight other code reads as a matrix, so never FP8 in memory: MLA's kv_b_proj, whose per-head views
# W_UK / W_UV the absorbed decode multiplies by itself (model/layers/mla_attention.py). `--quantization fp8` skips
# them and a block-FP8 checkpoint's copy is dequantised once at load (model/fp8_dequantized.py).
ALWAYS_HIGH_PRECISION = ("kv_b_proj",)


def scale_name(param_name: str) -> str:
    """The scale parameter of an FP8 weight: `x.weight` -> `x.weight_scale_inv`, `x.experts.gate_up_proj` ->
    `x.experts.gate_up_proj_scale_inv` (the checkpoints' names)."""
    return param_name + SCALE_SUFFIX


def weight_of_scale(param_name: str) -> str | None:
    return param_name[: -len(SCALE_SUFFIX)] if param_name.endswith(SCALE_SUFFIX) else None


def online_targets(model: nn.Module) -> list[str]:
    """Module names `--quantization fp8` makes FP8: every routed-experts module (zero-padded to whole 128-blocks
    where H or I is not one, model/layers/fp8.py) and every linear but HIGH_PRECISION_LINEARS whose input size is a
    multiple of 128 (FP8 activations are quantised per 128 columns; the others, e.g. gpt-oss's q/k/v with K = 2880,
    stay in high precision, and the log says how many). ALWAYS_HIGH_PRECISION linears stay too."""
    targets, kept = [], []
    skipped = HIGH_PRECISION_LINEARS + ALWAYS_HIGH_PRECISION
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            targets.append(name)
        elif isinstance(module, Linear) and name.rsplit(".", 1)[-1] not in skipped:
            (targets if module.in_features % FP8_BLOCK == 0 else kept).append(name)
    if kept:
        logger.info("--quantization fp8: %d linears keep high precision (input size not a multiple of %d), e.g. %s",
                    len(kept), FP8_BLOCK, kept[0])
    return targets


def _twin(module: nn.Module) -> nn.Module:
    if isinstance(module, Linear):
        bias = module.bias
        return Fp8Linear(module.in_features, module.out_features, bias is not None,
                         None if bias is None else bias.dtype)
    if isinstance(module, Experts):
        E, H, inter = module.down_proj.shape
        bias = module.down_proj_bias
        return Fp8Experts(E, H, inter, module.activation, bias is not None, None if bias is None else bias.dtype,
                          pad=True)
    raise TypeError(f"{type(module).__name__} has no FP8 form (only Linear and Experts do)")


@torch.no_grad()
def apply_fp8(model: nn.Module, targets: list[str]) -> nn.Module:
    """Swap each target module for its FP8 twin, on the device its weights are on; returns `model`."""
    for name in targets:
        if name.rsplit(".", 1)[-1] in ALWAYS_HIGH_PRECISION:
            raise ValueError(f"{name} is read as a high-precision matrix and cannot be FP8 (ALWAYS_HIGH_PRECISION)")
        old = model.get_submodule(name)
        device = next(old.parameters()).device
        with torch.device(device):
            new = _twin(old)
        if device.type != "meta":
            for param_name, param in old.named_parameters(recurse=False):
                if param_name.endswith("bias"):  # biases stay high precision (Linear's and the experts')
                    new.get_parameter(param_name).copy_(param)
                else:
                    quantize_parameter(new, param_name, param)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        if device.type == "cuda":
            block_scaled_mm_supported(device)  # probed now, outside any CUDA-graph capture
    return model


@torch.no_grad()
def quantize_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Quantise `value` (the whole high-precision weight of FP8 parameter `name` of `module`) into that parameter
    and its block scales. A 3-D experts weight goes one expert at a time, so the float32 temporaries stay small."""
    param, scale = module.get_parameter(name), module.get_parameter(scale_name(name))
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    logical = owner.logical_shape(leaf) if isinstance(owner, Fp8Experts) else None
    if param.dtype != FP8_DTYPE or tuple(value.shape) != (logical or tuple(param.shape)):
        raise ValueError(f"{name}: cannot quantise a {tuple(value.shape)} tensor into {param.dtype} "
                         f"{tuple(param.shape)}")
    if logical:  # zero-padded to whole 128-blocks, one expert at a time
        for e in range(value.shape[0]):
            param[e], scale[e] = quantize_fp8_blocks(owner.pad_expert(leaf, value[e].to(param.device)))
    elif value.dim() == 3:
        for e in range(value.shape[0]):
            param[e], scale[e] = quantize_fp8_blocks(value[e].to(param.device))
    else:
        param[:], scale[:] = quantize_fp8_blocks(value.to(param.device))
