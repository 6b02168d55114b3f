"""FP8 (W8A8, DeepSeek-style block scales): the quantisers and the pure-torch MoE layer with the kernel's numerics.

The scheme (DESIGN.md §7; what a checkpoint's `quantization_config = {fmt: "e4m3", activation_scheme: "dynamic",
weight_block_size: [128, 128]}` means):

- Format: `float8_e4m3fn` (3 mantissa bits, largest finite value 448, no inf). Every scale is float32 and
  dequantised = fp8 × scale (the checkpoints' `weight_scale_inv` convention).
- One rule for every quantised group: `amax = max|v|` over the group in float32, clamped to ≥ AMAX_FLOOR (a zero
  group gets a tiny finite scale and quantises to zeros, never NaN); `scale = amax / 448` (float32 IEEE division);
  `q = (v / scale).clamp(-448, 448)` cast to e4m3 with round-to-nearest-even. The element at amax maps to ±448.
- Activations: one group per (row, 128 columns along K); K must be a multiple of 128. `x [R, K]` gives
  `q [R, K]` and `scale [R, K/128]`.
- Weights: one group per 128×128 block of `w [..., N, K]`, `scale [..., ceil(N/128), ceil(K/128)]`; a ragged last
  block (N or K not a multiple of 128) is the block padded logically with zeros (padding never changes the amax).

The layer (`fused_moe_fp8_reference`): x is quantised once per token; each expert's rows and weights are
dequantised and multiplied in `compute_dtype` (float32, or float64 for a golden reference); h = SiLU(gate)·up in that
dtype on the unrounded GEMM1 output (+ the w13 bias; the activation of `model.kernels.activation`); h is quantised per (row, 128 columns) by the same rule (from float32); GEMM2 on
the dequantised h and w2 (+ the w2 bias); × routing weight; the k slots of a token summed in slot order in `compute_dtype`; output
in x.dtype. Routing as `reference.fused_moe_reference`: rows (token, slot) ascending within each expert, ids outside
[0, E) route nowhere. The CUDA kernel instead scales each 128-wide K block's fp8 partial sum by a_scale·b_scale
into a float32 accumulator — the same products and scales, so it differs from this reference only by float32
summation order (and the rare fp8 rounding decision that order flips in h).
"""

import torch
import torch.nn.functional as F

from model.kernels.activation import Activation, apply_activation

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128
AMAX_FLOOR = 1e-10


def _quantize(v: torch.Tensor, amax: torch.Tensor, expand) -> tuple[torch.Tensor, torch.Tensor]:
    """v float32, amax per group; expand(scale) broadcasts a per-group tensor against v."""
    # A tensor divisor, not the Python scalar: torch turns `tensor / scalar` into a multiplication by the
    # reciprocal on CUDA, which is not the IEEE quotient the kernels (and the CPU) compute.
    amax = amax.clamp_min(AMAX_FLOOR)
    scale = amax / torch.full_like(amax, FP8_MAX)  # float32
    q = (v / expand(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations: x [..., K] (K a multiple of 128) -> (q [..., K] e4m3, scale [..., K/128] float32)."""
    K = x.shape[-1]
    if K % FP8_BLOCK:
        raise ValueError(f"quantize_fp8_groups needs the last dimension to be a multiple of {FP8_BLOCK}, got {K}")
    v = x.float().reshape(*x.shape[:-1], K // FP8_BLOCK, FP8_BLOCK)  # [..., K/128, 128]
    q, scale = _quantize(v, v.abs().amax(dim=-1), lambda s: s.unsqueeze(-1))
    return q.reshape(x.shape), scale


def dequantize_fp8_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., K] e4m3, scale [..., K/128] -> q × scale in `dtype` (exact in float64)."""
    return q.to(dtype) * scale.to(dtype).repeat_interleave(FP8_BLOCK, dim=-1)[..., : q.shape[-1]]


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights: w [..., N, K] -> (q [..., N, K] e4m3, scale [..., ceil(N/128), ceil(K/128)] float32).
    One [N, K] matrix at a time: the float32 working copies are one matrix's, not the stack's (DeepSeek-V3's
    w13 [256, 4096, 7168] in bf16 is 15 GB, its float32 copy would be 30 GB more)."""
    *lead, N, K = w.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(*lead, nb, kb, dtype=torch.float32, device=w.device)
    for w_i, q_i, scale_i in zip(w.reshape(-1, N, K), q.view(-1, N, K), scale.view(-1, nb, kb)):
        padded = F.pad(w_i.float(), (0, kb * FP8_BLOCK - K, 0, nb * FP8_BLOCK - N))  # zeros never raise an amax
        v = padded.reshape(nb, FP8_BLOCK, kb, FP8_BLOCK)
        q_v, scale_v = _quantize(v, v.abs().amax(dim=(-3, -1)), lambda s: s[:, None, :, None])
        q_i.copy_(q_v.reshape(nb * FP8_BLOCK, kb * FP8_BLOCK)[:N, :K])
        scale_i.copy_(scale_v)
    return q, scale


def dequantize_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., N, K] e4m3, scale [..., ceil(N/128), ceil(K/128)] -> q × scale in `dtype` (exact in float64)."""
    N, K = q.shape[-2:]
    if tuple(scale.shape[-2:]) != (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK)) or scale.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"scale {tuple(scale.shape)} does not match 128x128 blocks of q {tuple(q.shape)}")
    full = scale.to(dtype).repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return q.to(dtype) * full[..., :N, :K]


def expert_rows(topk_ids: torch.Tensor, E: int):
    """Yields (e, rows) per non-empty expert: rows are flat token·k + slot indices, ascending (stable sort).
    Ids outside [0, E) route nowhere."""
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    flat_ids = flat_ids.masked_fill((flat_ids < 0) | (flat_ids >= E), E)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E + 1)[:E].tolist()
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, order[start : start + n]
            start += n


def fused_moe_fp8_reference(
    x: torch.Tensor,  # [T, H] bfloat16 (or float32)
    w13: torch.Tensor,  # [E, 2I, H] e4m3, gate rows then up rows
    w13_scale: torch.Tensor,  # [E, ceil(2I/128), ceil(H/128)] float32
    w2: torch.Tensor,  # [E, H, I] e4m3
    w2_scale: torch.Tensor,  # [E, ceil(H/128), ceil(I/128)] float32
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int32
    compute_dtype: torch.dtype = torch.float32,
    *,
    activation: Activation | str = Activation.SILU,
    w13_bias: torch.Tensor | None = None,  # [E, 2I]
    w2_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:
    """Returns out [T, H] in x.dtype with the numerics of the module docstring (unchecked: callers check)."""
    activation = Activation(activation)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    cdt = compute_dtype
    T, H = x.shape
    k = topk_ids.shape[1]
    inter = w2.shape[2]
    xd = dequantize_fp8_groups(*quantize_fp8_groups(x), cdt)  # [T, H], quantised once per token
    per_slot = torch.zeros(T * k, H, dtype=cdt, device=x.device)
    for e, rows in expert_rows(topk_ids, w13.shape[0]):
        gate_up = xd[rows // k] @ dequantize_fp8_blocks(w13[e], w13_scale[e], cdt).t()  # [n, 2I]
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[e].to(cdt)
        h = apply_activation(gate_up[:, :inter], gate_up[:, inter:], activation)  # [n, I]
        hd = dequantize_fp8_groups(*quantize_fp8_groups(h), cdt)  # [n, I]
        ye = hd @ dequantize_fp8_blocks(w2[e], w2_scale[e], cdt).t()  # [n, H]
        if w2_bias is not None:
            ye = ye + w2_bias[e].to(cdt)
        per_slot[rows] = ye * topk_weights.reshape(-1)[rows, None].to(cdt)
    per_slot = per_slot.view(T, k, H)
    out = per_slot[:, 0]
    for s in range(1, k):  # slot order, as the kernel's combine
        out = out + per_slot[:, s]
    return out.to(x.dtype)  # [T, H]
