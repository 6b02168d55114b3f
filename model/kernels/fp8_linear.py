"""`fp8_linear`: y = x · Wᵀ (+ bias) with W in float8_e4m3fn and one float32 scale per 128x128 block (dequantised W =
fp8 × scale), activations quantised on the fly per (row, 128 columns): the numerics of `model.kernels.fp8`, so a
dense FP8 linear and the FP8 experts of a checkpoint compute the same way.

Paths, chosen per call from shapes and device only (no host sync, CUDA-graph capturable):
- **block `torch._scaled_mm`** (CUDA, sm_90, cuBLAS >= 12.9, N a multiple of 16): the DeepSeek recipe, 1x128 activation
  scales (M-major, as cuBLAS wants them) x 128x128 weight scales, each K block's partial sum scaled and promoted in
  float32. Whether this torch build takes the recipe is probed once per device (`block_scaled_mm_supported`).
- Where the probe failed (the torch 2.11 / CUDA 13 build refuses the recipe on the H100), one of our own kernels with
  the same numerics, chosen by `STATICMOE_FP8_DENSE` (read once per process; default `auto`):
  - **cuda**: the MoE layer's FP8 GEMM2 kernel with one expert that every row is routed to (`csrc/moe/dense_fp8.cu`:
    quantiser + GEMM in one call), on sm_90 with the `_C` extension built, for bf16 x, N a multiple of 8 and
    contiguous weight, scales and (bf16) bias; any other call takes Triton;
  - **triton**: `model.kernels.triton_fp8_gemm` after the quantiser, except calls of up to
    `triton_fp8_gemv.DECODE_MAX_ROWS` rows (decode), which take `model.kernels.triton_fp8_gemv` (x quantised inside
    the GEMM, K split over the SMs, one launch) unless `STATICMOE_FP8_DECODE_LINEAR=0`;
  - **auto**: cuda for large GEMMs (`prefers_cuda_kernel`), Triton for the rest.
- **reference** (the CPU, or a GPU without Triton): x quantised and dequantised, W dequantised, one matmul in
  float32. On a GPU the dequantised W exists only for the duration of the call (one layer at a time), never stored;
  it is slower than the block GEMM, and the log says once per process that this fallback runs.
"""

import functools
import logging
import os

import torch
import torch.nn.functional as F

from model.kernels import extension, triton_fp8_gemm, triton_fp8_gemv
from model.kernels.fp8 import FP8_BLOCK, FP8_DTYPE, dequantize_fp8_blocks, dequantize_fp8_groups, quantize_fp8_groups
from model.kernels.knobs import env_switch

logger = logging.getLogger(__name__)


def check_fp8_linear_inputs(x, weight, weight_scale, bias=None) -> None:
    """Raise TypeError/ValueError naming the argument for anything `fp8_linear` cannot take."""
    if weight.dtype != FP8_DTYPE:
        raise TypeError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if weight_scale.dtype != torch.float32:
        raise TypeError(f"weight_scale must be float32, got {weight_scale.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] do not match: {tuple(x.shape)} and {tuple(weight.shape)}")
    N, K = weight.shape
    if K % FP8_BLOCK:
        raise ValueError(f"an FP8 linear needs its input size K={K} to be a multiple of {FP8_BLOCK} (activations "
                         f"are quantised per 128 columns)")
    want = (-(-N // FP8_BLOCK), K // FP8_BLOCK)
    if tuple(weight_scale.shape) != want:
        raise ValueError(f"weight_scale must be float32 {list(want)} (one scale per 128x128 block of weight "
                         f"[{N}, {K}]), got {tuple(weight_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if len({t.device for t in (x, weight, weight_scale)}) != 1:
        raise ValueError("x, weight and weight_scale must be on one device")


def fp8_linear_reference(x, weight, weight_scale, bias=None) -> torch.Tensor:
    """Dequantise-then-matmul in float32 with the activation quantisation of the kernels; out in x.dtype."""
    xd = dequantize_fp8_groups(*quantize_fp8_groups(x))  # [..., K] float32
    out = F.linear(xd, dequantize_fp8_blocks(weight, weight_scale))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.cache
def block_scaled_mm_supported(device: torch.device) -> bool:
    """One small block-recipe `torch._scaled_mm` on `device`, compared with the reference: True if it runs and agrees.
    Called outside CUDA-graph capture (at model load, `model.quantization`), so its result is cached before any
    capture; a False is logged with the reason."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(17, 256, generator=gen, device=device).to(torch.bfloat16)
    w = torch.randn(256, 256, generator=gen, device=device)
    from model.kernels.fp8 import quantize_fp8_blocks

    q, s = quantize_fp8_blocks(w)
    try:
        got = _scaled_mm_path(x, q, s, None).float()
        torch.cuda.synchronize(device)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        logger.info("torch._scaled_mm refused the 1x128 x 128x128 block recipe on %s (%s); dense FP8 linears run "
                    "our CUDA or Triton kernels (without either: dequantise-then-matmul, logged at the first call)",
                    torch.cuda.get_device_name(device), str(err).splitlines()[0][:200])
        return False
    want = fp8_linear_reference(x.float(), q, s)
    err = float((got - want).abs().max() / want.abs().max())
    if err > 2e-2:  # bf16 output rounding is ~4e-3; anything far above is a wrong layout, not rounding
        logger.warning("block torch._scaled_mm disagrees with the reference (max rel err %.3g); dense FP8 linears "
                       "run our CUDA or Triton kernels instead", err)
        return False
    return True


def _quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x2.dtype == torch.bfloat16 and extension.available_for(x2.device):
        return extension.quantize_rows_fp8_cuda(x2)  # one launch; bit-identical to quantize_fp8_groups
    return quantize_fp8_groups(x2)


def _scaled_mm_path(x, weight, weight_scale, bias) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    xq, xs = _quantize_rows(x2)  # [M, K] e4m3, [M, K/128]
    out = torch._scaled_mm(
        xq,
        weight.t(),  # [K, N] column-major: the stored [N, K] row-major weight, no copy
        xs.t().contiguous().t(),  # 1x128 scales M-major: stride (1, M)
        weight_scale.t(),  # [K/128, N/128] whose transpose is the stored row-major block grid
        out_dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype,
    )  # [M, N]
    if bias is not None:
        out = out + bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


DENSE_FP8_KERNELS = ("auto", "cuda", "triton")


@functools.cache
def dense_fp8_kernel() -> str:
    """`STATICMOE_FP8_DENSE` (auto | cuda | triton, default auto): our kernel for dense FP8 linears where block
    `torch._scaled_mm` is unavailable. Read once per process."""
    value = os.environ.get("STATICMOE_FP8_DENSE", "auto")
    if value not in DENSE_FP8_KERNELS:
        raise ValueError(f"STATICMOE_FP8_DENSE={value!r}: want one of {', '.join(DENSE_FP8_KERNELS)}")
    return value


def prefers_cuda_kernel(m: int, n: int, k: int) -> bool:
    """`auto`'s choice for an [m, k] x [n, k]ᵀ linear, from `bench_fp8_linear.py` on the H100 (2026-12-06, gpu_runs.md):
    the CUDA kernel's persistent 128x256 tiles win where there are enough rows and a large weight (DeepSeek-V3's q_b
    and o at m >= 512: 1.1-1.4x Triton; every shape at m = 4096: 1.1-1.3x); Triton's narrow tiles win below, where the
    CUDA kernel's few large tiles leave SMs idle (Qwen3's o at m = 1024: 30.9 vs 41.0 us)."""
    return m >= 4096 or (m >= 512 and n * k >= 16 << 20)


def _cuda_fits(x, weight, weight_scale, bias) -> bool:
    """The shapes and layouts the CUDA dense kernel takes (csrc/moe/dense_fp8.h); the device is checked apart."""
    return (x.dtype == torch.bfloat16 and weight.shape[0] % 8 == 0 and weight.is_contiguous()
            and weight_scale.is_contiguous()
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def dense_fp8_path(device: torch.device, rows: int = 1) -> str:
    """Which path `fp8_linear` takes for `rows` bf16 activations of a 128x128 weight (N a multiple of 16,
    contiguous) on `device`: "scaled_mm", "cuda", "triton" or "reference" (`fp8_linear_path` on such a call, with
    shape-only tensors)."""
    x = torch.empty(rows, FP8_BLOCK, dtype=torch.bfloat16, device="meta")
    weight = torch.empty(FP8_BLOCK, FP8_BLOCK, dtype=FP8_DTYPE, device="meta")
    return fp8_linear_path(x, weight, torch.empty(1, 1, device="meta"), device=device)


@functools.cache
def decode_linear_enabled() -> bool:
    """Whether Triton calls of few rows take `triton_fp8_gemv`: yes unless `STATICMOE_FP8_DECODE_LINEAR=0` (it
    measured faster than cuBLAS bf16 and the block GEMM at M <= 16 on the H100, and its GPU tests passed in session
    13; benchmarks/NOTES.md). Read once per process."""
    return env_switch("STATICMOE_FP8_DECODE_LINEAR", default=True)


def _triton_path(x, weight, weight_scale, bias) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    if x2.shape[0] <= triton_fp8_gemv.DECODE_MAX_ROWS and decode_linear_enabled():
        out = triton_fp8_gemv.fp8_decode_linear(x2, weight, weight_scale, bias, x.dtype)  # [M, N]
        return out.reshape(*x.shape[:-1], weight.shape[0])
    xq, xs = _quantize_rows(x2)  # [M, K] e4m3, [M, K/128] row-major
    out = triton_fp8_gemm.fp8_block_gemm(xq, xs, weight, weight_scale, bias, x.dtype)  # [M, N]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _cuda_path(x, weight, weight_scale, bias) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K] bf16
    out = extension.dense_fp8_linear_cuda(x2, weight, weight_scale, bias)  # [M, N] bf16
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_path(x, weight, weight_scale, bias=None, device: torch.device | None = None) -> str:
    """The path one `fp8_linear` call takes, from dtypes, shapes, layouts and the device only: "scaled_mm", "cuda",
    "triton" or "reference". `device` defaults to x's (the CPU tests pass a CUDA device with CPU tensors)."""
    device = x.device if device is None else device
    if device.type != "cuda":
        return "reference"
    if x.dtype != torch.float32 and weight.shape[0] % 16 == 0 and block_scaled_mm_supported(device):
        return "scaled_mm"
    kernel = dense_fp8_kernel()
    if kernel == "auto":
        n, k = weight.shape
        kernel = "cuda" if prefers_cuda_kernel(x.numel() // k, n, k) else "triton"
    if kernel == "cuda" and _cuda_fits(x, weight, weight_scale, bias) and extension.available_for(device):
        return "cuda"
    if triton_fp8_gemm.available():
        return "triton"
    return "reference"


_PATHS = {"scaled_mm": _scaled_mm_path, "cuda": _cuda_path, "triton": _triton_path}
_fallback_logged = False


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """x [..., K] -> [..., N] in x.dtype; weight [N, K] e4m3, weight_scale [ceil(N/128), K/128] float32."""
    global _fallback_logged
    if check:
        check_fp8_linear_inputs(x, weight, weight_scale, bias)
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    path = fp8_linear_path(x, weight, weight_scale, bias)
    if path != "reference":
        return _PATHS[path](x, weight, weight_scale, bias)
    if x.is_cuda and not _fallback_logged:
        _fallback_logged = True
        logger.warning("an FP8 linear [%d, %d] runs the dequantise-then-matmul fallback on the GPU (slower: no "
                       "block torch._scaled_mm and no Triton here)", *weight.shape)
    return fp8_linear_reference(x, weight, weight_scale, bias)
