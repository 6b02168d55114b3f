"""Loads the compiled `_C` extension (if it was built) and launches its kernels on torch tensors.

`_C` is torch-free: it takes raw device pointers, sizes and the caller's CUDA stream. Scratch memory comes from
torch's caching allocator, so launches allocate no device memory of their own and are CUDA-graph capturable.
"""

import functools

import torch

try:
    from model.kernels import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
except ImportError as err:  # built without nvcc, or not built at all
    _C = None
    IMPORT_ERROR = err

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}


def is_built() -> bool:
    return _C is not None


@functools.cache
def available_for(device: torch.device) -> bool:
    """The extension is built and the device is a Hopper GPU (sm_90) that our sm_90a code runs on."""
    if _C is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def describe() -> str:
    if _C is None:
        return f"pure-torch reference (extension not built: {IMPORT_ERROR})"
    if torch.cuda.is_available() and available_for(torch.device("cuda", torch.cuda.current_device())):
        return "CUDA sm_90a kernels (staticmoe._C)"
    return "pure-torch reference (extension built, no Hopper GPU)"


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def moe_workspace(T: int, k: int, E: int, H: int, I: int, device, fp8: bool = False) -> torch.Tensor:
    return torch.empty(_C.moe_workspace_bytes(T, k, E, H, I, fp8), dtype=torch.uint8, device=device)


def fused_moe_cuda(x, w13, w2, topk_weights, topk_ids, expert_load, out=None, workspace=None, *, activation: int = 0,
                   w13_bias=None, w2_bias=None):
    """Unchecked launch (callers check first). `out`/`workspace` may be passed in, e.g. poisoned by tests.
    `activation` is the csrc code (`model.kernels.activation.ACTIVATION_CODES`); biases are x.dtype or None."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    out = torch.empty_like(x) if out is None else out
    workspace = moe_workspace(T, k, E, H, two_i // 2, x.device) if workspace is None else workspace
    _C.moe_forward(
        x.data_ptr(), w13.data_ptr(), w2.data_ptr(), topk_weights.data_ptr(), topk_ids.data_ptr(),
        out.data_ptr(), workspace.data_ptr(), workspace.numel(),
        0 if expert_load is None else expert_load.data_ptr(),
        0 if w13_bias is None else w13_bias.data_ptr(), 0 if w2_bias is None else w2_bias.data_ptr(), activation,
        T, k, E, H, two_i // 2, DTYPE_CODES[x.dtype], x.device.index, _stream(x.device),
    )
    return out


def fused_moe_fp8_cuda(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, expert_load, out=None, workspace=None,
                       *, activation: int = 0, w13_bias=None, w2_bias=None):
    """Unchecked launch of the FP8-weight layer (x bf16, w13/w2 e4m3 with 128x128 block scales, biases bf16)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    out = torch.empty_like(x) if out is None else out
    workspace = moe_workspace(T, k, E, H, two_i // 2, x.device, fp8=True) if workspace is None else workspace
    _C.moe_forward_fp8(
        x.data_ptr(), w13.data_ptr(), w13_scale.data_ptr(), w2.data_ptr(), w2_scale.data_ptr(),
        topk_weights.data_ptr(), topk_ids.data_ptr(), out.data_ptr(), workspace.data_ptr(), workspace.numel(),
        0 if expert_load is None else expert_load.data_ptr(),
        0 if w13_bias is None else w13_bias.data_ptr(), 0 if w2_bias is None else w2_bias.data_ptr(), activation,
        T, k, E, H, two_i // 2, x.device.index, _stream(x.device),
    )
    return out


def quantize_rows_fp8_cuda(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] bf16 (K a multiple of 128) -> (e4m3 [R, K], float32 scales [R, K/128]); the kernel GEMM1 reads."""
    R, K = x.shape
    q = torch.empty(R, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(R, K // 128, dtype=torch.float32, device=x.device)
    _C.quantize_rows_fp8(x.data_ptr(), R, K, q.data_ptr(), scale.data_ptr(), _stream(x.device))
    return q, scale


DENSE_FP8_TILES = {"choose": -1, "decode": 0, "large": 1, "cluster": 2}  # csrc/moe/tile_config.h TileKind


def dense_fp8_linear_cuda(x, weight, weight_scale, bias=None, out=None, workspace=None, *,
                          tiles: str = "choose") -> torch.Tensor:
    """x [M, K] bf16 -> [M, N] bf16 on the FP8 GEMM2 kernel with one expert (csrc/moe/dense_fp8.cu): x quantised per
    (row, 128 columns) inside the call. weight [N, K] e4m3 and weight_scale [ceil(N/128), K/128] float32, bias [N]
    bf16 or None; all contiguous, N a multiple of 8 (`fp8_linear` checks shapes and routes other cases elsewhere).
    `out`/`workspace` may be passed in (tests poison them). `tiles` overrides the tile chooser (benchmarks only):
    "decode" 64x128, "large" 128x256, "cluster" 128x256 on 2-CTA clusters."""
    if tiles not in DENSE_FP8_TILES:
        raise ValueError(f"dense_fp8_linear_cuda: tiles={tiles!r}, want one of {', '.join(DENSE_FP8_TILES)}")
    M, K = x.shape
    N = weight.shape[0]
    for name, t in (("x", x), ("weight", weight), ("weight_scale", weight_scale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"dense_fp8_linear_cuda: {name} must be contiguous")
    if x.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
        raise TypeError(f"dense_fp8_linear_cuda: x and bias must be bfloat16, got {x.dtype} and "
                        f"{None if bias is None else bias.dtype}")
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device) if out is None else out
    if workspace is None:
        workspace = torch.empty(_C.dense_fp8_workspace_bytes(M, K), dtype=torch.uint8, device=x.device)
    _C.dense_fp8_linear(
        x.data_ptr(), weight.data_ptr(), weight_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), M, K, N, workspace.data_ptr(), workspace.numel(), x.device.index, _stream(x.device),
        DENSE_FP8_TILES[tiles],
    )
    return out
