"""`fused_moe`: the whole MoE expert layer (plan + GEMM1 + activation + GEMM2 + weighted combine) as one custom op.

The activation between the GEMMs is an enum (`model.kernels.activation.Activation`: SiLU·up by default, gpt-oss's
clamped SwiGLU); optional expert biases w13_bias [E, 2I] and w2_bias [E, H] are added to the GEMM outputs (the w2
bias before the routing weight, so it is scaled by it like the product, as gpt-oss computes it).

On a CUDA tensor with the extension built for the device it runs our sm_90a kernels (decode sizes with small
experts: two Triton launches without a plan, `model.kernels.triton_decode_moe`); elsewhere it runs
the pure-torch reference. Checks happen once, here, at the boundary. Weights in float8_e4m3fn (with their 128×128
block scales) select the FP8 op, `staticmoe::fused_moe_fp8`, whose numerics `model.kernels.fp8` states.
"""

import torch

from model.kernels import extension, triton_decode_moe, triton_decode_moe_fp8
from model.kernels.activation import ACTIVATION_CODES, Activation, parse_activation
from model.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, fused_moe_fp8_reference
from model.kernels.reference import fused_moe_reference

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_EXPERTS = 1024


def check_moe_inputs(
    x, w13, w2, topk_weights, topk_ids, expert_load=None, skip_out_of_range_ids=False, *, w13_scale=None, w2_scale=None,
    activation=Activation.SILU, w13_bias=None, w2_bias=None,
) -> None:
    """Raise ValueError/TypeError naming the argument for anything the kernel cannot take."""
    tensors = dict(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    activation = parse_activation(activation)
    biases = {name: t for name, t in (("w13_bias", w13_bias), ("w2_bias", w2_bias)) if t is not None}
    for name, t in biases.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}.dtype {t.dtype} differs from x.dtype {x.dtype}")
    if x.dtype not in SUPPORTED_DTYPES and x.dtype != torch.float32:
        raise TypeError(f"x must be bfloat16, float16 or float32 (reference only), got {x.dtype}")
    fp8 = w13.dtype == FP8_DTYPE
    scales = dict(w13_scale=w13_scale, w2_scale=w2_scale)
    if fp8:
        if x.dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"x must be bfloat16 (or float32, reference only) with float8_e4m3fn weights, got {x.dtype}")
        if w2.dtype != FP8_DTYPE:
            raise TypeError(f"w2 must be float8_e4m3fn like w13, got {w2.dtype}")
        for name, t in scales.items():
            if t is None:
                raise ValueError(f"{name} is required with float8_e4m3fn weights (dequantised = fp8 x {name})")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.float32:
                raise TypeError(f"{name} must be float32, got {t.dtype}")
        tensors.update(scales)
    else:
        for name, t in scales.items():
            if t is not None:
                raise ValueError(f"{name} is only for float8_e4m3fn weights, but w13 is {w13.dtype}")
        for name in ("w13", "w2"):
            if tensors[name].dtype != x.dtype:
                raise TypeError(f"{name}.dtype {tensors[name].dtype} differs from x.dtype {x.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if topk_ids.dtype != torch.int32:
        raise TypeError(f"topk_ids must be int32, got {topk_ids.dtype}")
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or topk_weights.dim() != 2 or topk_ids.dim() != 2:
        raise ValueError(
            "expected x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k]; got "
            f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}, {tuple(topk_weights.shape)}, "
            f"{tuple(topk_ids.shape)}"
        )
    T, H = x.shape
    E, two_i, h13 = w13.shape
    inter = two_i // 2
    if h13 != H or two_i % 2:
        raise ValueError(f"w13 must be [E, 2I, H={H}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (E, H, inter):
        raise ValueError(f"w2 must be [E={E}, H={H}, I={inter}], got {tuple(w2.shape)}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"number of experts {E} must be in [1, {MAX_EXPERTS}]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [T={T}, k]"
        )
    if topk_ids.shape[1] < 1:
        raise ValueError("top-k must be at least 1")
    for name, want in (("w13_bias", (E, two_i)), ("w2_bias", (E, H))):
        if name in biases and tuple(biases[name].shape) != want:
            raise ValueError(f"{name} must be [{', '.join(map(str, want))}], got {tuple(biases[name].shape)}")
    tensors.update(biases)
    if H % 8 or inter % 8:
        raise ValueError(f"hidden size H={H} and intermediate size I={inter} must be multiples of 8")
    if fp8:
        if H % FP8_BLOCK or inter % FP8_BLOCK:
            raise ValueError(
                f"the FP8 path needs hidden size H={H} and intermediate size I={inter} to be multiples of {FP8_BLOCK}"
            )
        blocks = lambda n: -(-n // FP8_BLOCK)  # noqa: E731
        for name, want in (("w13_scale", (E, blocks(two_i), blocks(H))), ("w2_scale", (E, blocks(H), blocks(inter)))):
            if tuple(scales[name].shape) != want:
                raise ValueError(
                    f"{name} must be float32 {list(want)} (one scale per 128x128 weight block), "
                    f"got {tuple(scales[name].shape)}"
                )
    devices = {t.device for t in tensors.values()}
    if expert_load is not None:
        if not isinstance(expert_load, torch.Tensor):
            raise TypeError(f"expert_load must be a torch.Tensor or None, got {type(expert_load).__name__}")
        if expert_load.dtype != torch.int64 or tuple(expert_load.shape) != (E,):
            raise ValueError(f"expert_load must be int64 [E={E}], got {expert_load.dtype} {tuple(expert_load.shape)}")
        if not expert_load.is_contiguous():
            raise ValueError("expert_load must be contiguous (the kernel adds counts through its data pointer)")
        devices.add(expert_load.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    # Range check of expert ids: on the CPU it is free; on the GPU it would need a sync, so the kernel
    # instead skips out-of-range ids (they contribute nothing) — checked here only off the hot path.
    if (not skip_out_of_range_ids and topk_ids.device.type == "cpu" and topk_ids.numel()
            and not torch.compiler.is_compiling()):
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"expert ids must be in [0, {E}), got values in [{lo}, {hi}]")


def uses_cuda_kernel(x: torch.Tensor) -> bool:
    """True when `fused_moe(x, ...)` runs our CUDA kernels rather than the pure-torch reference."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES and extension.available_for(x.device)


def _count_expert_load(expert_load: torch.Tensor | None, topk_ids: torch.Tensor, E: int) -> None:
    """The reference path's expert_load: ids outside [0, E) route nowhere and are not counted, as in the kernel."""
    if expert_load is not None:
        flat = topk_ids.reshape(-1).long()
        in_range = (flat >= 0) & (flat < E)
        counts = torch.zeros(E + 1, dtype=expert_load.dtype, device=flat.device)  # scatter_add: no sync, graph-safe
        counts.scatter_add_(0, flat.masked_fill(~in_range, E), torch.ones_like(flat, dtype=expert_load.dtype))
        expert_load += counts[:E].to(expert_load.device)


@torch.library.custom_op("staticmoe::fused_moe", mutates_args=("expert_load",))
def _fused_moe_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_load: torch.Tensor | None,
    activation: str = Activation.SILU.value,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if triton_decode_moe.applies(x, w13, topk_ids):  # decode sizes, small experts: two launches, no plan
        return triton_decode_moe.decode_moe(x, w13, w2, topk_weights, topk_ids, expert_load, Activation(activation),
                                            w13_bias, w2_bias)
    if uses_cuda_kernel(x):
        return extension.fused_moe_cuda(x, w13, w2, topk_weights, topk_ids, expert_load,
                                        activation=ACTIVATION_CODES[Activation(activation)],
                                        w13_bias=w13_bias, w2_bias=w2_bias)
    _count_expert_load(expert_load, topk_ids, w13.shape[0])
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids, activation=activation, w13_bias=w13_bias,
                               w2_bias=w2_bias)


@_fused_moe_op.register_fake
def _(x, w13, w2, topk_weights, topk_ids, expert_load, activation="silu", w13_bias=None, w2_bias=None):
    return torch.empty_like(x)


@torch.library.custom_op("staticmoe::fused_moe_fp8", mutates_args=("expert_load",))
def _fused_moe_fp8_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_load: torch.Tensor | None,
    activation: str = Activation.SILU.value,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if triton_decode_moe.applies(x, w13, topk_ids):  # decode sizes, small experts: two launches, no plan
        return triton_decode_moe_fp8.decode_moe_fp8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                                                    expert_load, Activation(activation), w13_bias, w2_bias)
    if x.dtype == torch.bfloat16 and uses_cuda_kernel(x):
        return extension.fused_moe_fp8_cuda(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_load,
                                            activation=ACTIVATION_CODES[Activation(activation)], w13_bias=w13_bias,
                                            w2_bias=w2_bias)
    _count_expert_load(expert_load, topk_ids, w13.shape[0])
    return fused_moe_fp8_reference(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, activation=activation,
                                   w13_bias=w13_bias, w2_bias=w2_bias)


@_fused_moe_fp8_op.register_fake
def _(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_load, activation="silu", w13_bias=None,
      w2_bias=None):
    return torch.empty_like(x)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int32
    expert_load: torch.Tensor | None = None,  # [E] int64, tokens per expert are added to it
    skip_out_of_range_ids: bool = False,
    *,
    w13_scale: torch.Tensor | None = None,  # [E, ceil(2I/128), ceil(H/128)] float32, with float8_e4m3fn w13
    w2_scale: torch.Tensor | None = None,  # [E, ceil(H/128), ceil(I/128)] float32, with float8_e4m3fn w2
    activation: Activation | str = Activation.SILU,
    w13_bias: torch.Tensor | None = None,  # [E, 2I] in x.dtype: gate biases, then up biases
    w2_bias: torch.Tensor | None = None,  # [E, H] in x.dtype
) -> torch.Tensor:
    """out[t] = Σ_s topk_weights[t, s] · (w2[e] · act(w13[e, :I] · x[t] + b_g, w13[e, I:] · x[t] + b_u) + b2[e]),
    e = topk_ids[t, s]; act = SiLU(gate)·up by default, or gpt-oss's clamped SwiGLU (`Activation.SWIGLU_OAI`).

    Expert ids outside [0, E) are an error on the CPU by default. With `skip_out_of_range_ids=True` they are a
    contract instead: such a slot routes nowhere (contributes nothing, is not counted in expert_load) — how an
    expert-parallel rank passes the slots routed to other ranks. The CUDA kernel always skips them (checking there
    would need a host sync).

    FP8: with w13 and w2 in float8_e4m3fn, pass their block scales (dequantised weight = fp8 × scale); x is bf16,
    H and I multiples of 128; activations are quantised per (token, 128 columns) on the fly (`model.kernels.fp8`).
    Biases and the activation work the same way there (biases in x.dtype, bf16)."""
    check_moe_inputs(
        x, w13, w2, topk_weights, topk_ids, expert_load, skip_out_of_range_ids, w13_scale=w13_scale, w2_scale=w2_scale,
        activation=activation, w13_bias=w13_bias, w2_bias=w2_bias,
    )
    if x.shape[0] == 0:
        return x.new_empty(x.shape)
    if w13.dtype == FP8_DTYPE:
        return _fused_moe_fp8_op(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_load,
                                 parse_activation(activation).value, w13_bias, w2_bias)
    return _fused_moe_op(x, w13, w2, topk_weights, topk_ids, expert_load, parse_activation(activation).value,
                         w13_bias, w2_bias)
