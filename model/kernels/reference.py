"""Pure-torch MoE layer: the exact reference for the CUDA op and the CPU fallback.

Same contract as `model.kernels.moe.fused_moe`: gather each expert's rows, GEMM1 (+ w13 bias), the activation
(SiLU(gate)·up by default, `model.kernels.activation`), down-project (+ w2 bias), scale by the routing weight, then
sum over the k slots of each token in fp32 (slot order, so the result is deterministic). Biases are added to the
GEMM outputs in the accumulation dtype, before the activation / the routing weight, as the kernel's epilogues do.
"""

import torch

from model.kernels.activation import Activation, apply_activation


def graph_capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def fused_moe_reference(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]  gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k] int32
    compute_dtype: torch.dtype | None = None,
    *,
    activation: Activation | str = Activation.SILU,
    w13_bias: torch.Tensor | None = None,  # [E, 2I]  gate biases, then up biases
    w2_bias: torch.Tensor | None = None,  # [E, H]
) -> torch.Tensor:
    """Returns out [T, H] in x.dtype. `compute_dtype` overrides the GEMM dtype (float64 for a golden reference)."""
    activation = Activation(activation)
    T, H = x.shape
    k = topk_ids.shape[1]
    cdt = compute_dtype or x.dtype
    inter = w2.shape[2]
    acc_dtype = torch.float64 if cdt == torch.float64 else torch.float32  # accumulation/activation precision
    per_slot = torch.zeros(T, k, H, dtype=acc_dtype, device=x.device)
    E = w13.shape[0]
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    flat_ids = flat_ids.masked_fill((flat_ids < 0) | (flat_ids >= E), E)  # out-of-range ids route nowhere
    weights = topk_weights.reshape(-1).to(acc_dtype)  # [T*k]

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:  # [n, H] rows of x -> [n, H] expert e's outputs
        gate_up = (xe @ w13[e].to(cdt).t()).to(acc_dtype)  # [n, 2I]
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[e].to(acc_dtype)
        h = apply_activation(gate_up[:, :inter], gate_up[:, inter:], activation).to(cdt)  # [n, I]
        ye = (h @ w2[e].to(cdt).t()).to(acc_dtype)  # [n, H]
        return ye if w2_bias is None else ye + w2_bias[e].to(acc_dtype)

    slots = per_slot.view(T * k, H)
    if graph_capturing(x):
        # Inside a CUDA graph the counts cannot be read back (a sync): every expert runs on every slot's row and
        # each slot keeps its own expert's output. E times the FLOPs; only float32 models on a GPU come here.
        xs = x[torch.arange(T * k, device=x.device) // k].to(cdt)  # [T*k, H]
        for e in range(E):
            mine = (flat_ids == e)[:, None]  # [T*k, 1]
            slots.copy_(torch.where(mine, expert(e, xs) * weights[:, None], slots))
        return per_slot.sum(dim=1).to(x.dtype)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) ascending within each expert; skipped slots last
    counts = torch.bincount(flat_ids, minlength=E + 1)[:E].tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]  # flat (token*k + slot) indices
        start += n
        slots[rows] = expert(e, x[rows // k].to(cdt)) * weights[rows, None]
    return per_slot.sum(dim=1).to(x.dtype)  # [T, H]
