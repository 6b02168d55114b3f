"""Writing one step's new K/V rows into the paged cache in one Triton launch.

The torch path (model/layers/paged_attention.py `write_kv`) costs four kernels per layer for GQA (gather K rows,
index_copy K, the same for V: ~11 µs on the H100 at batch 1) and three for MLA (cat, gather, index_copy). Here one
program per written row copies both sources to their cache slot, casting to the cache dtype:
    dst_a[slots[i], :WA] = a[rows[i]]    dst_b[slots[i], b_offset : b_offset + WB] = b[rows[i]]
GQA: a = K, b = V (two caches, offset 0); MLA: a = the latent, b = the rope key (one cache row, b after a).
Padding rows of a CUDA-graph batch re-write a real row to its own slot (AttentionPlan.build), so duplicate slots
carry identical data and the order of the programs does not matter.
"""

import torch

from model.kernels import pdl
from model.layers.triton_paged import tl, triton

if triton is not None:
    from model.kernels.pdl import wait_for_predecessor

    @triton.jit
    def _write_rows_kernel(a_ptr, b_ptr, dst_a_ptr, dst_b_ptr, rows_ptr, slots_ptr, a_stride, b_stride, dst_stride,
                           B_OFFSET: tl.constexpr, WIDTH_A: tl.constexpr, WIDTH_B: tl.constexpr,
                           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # model/kernels/pdl.py: nothing an earlier kernel writes is read before it
        i = tl.program_id(0)
        row = tl.load(rows_ptr + i).to(tl.int64)
        slot = tl.load(slots_ptr + i).to(tl.int64)
        offs_a = tl.arange(0, BLOCK_A)
        a = tl.load(a_ptr + row * a_stride + offs_a, mask=offs_a < WIDTH_A)
        a = a.to(dst_a_ptr.dtype.element_ty)  # compiled: a downcast rounds to nearest even, as torch's .to()
        tl.store(dst_a_ptr + slot * dst_stride + offs_a, a, mask=offs_a < WIDTH_A)
        offs_b = tl.arange(0, BLOCK_B)
        b = tl.load(b_ptr + row * b_stride + offs_b, mask=offs_b < WIDTH_B)
        b = b.to(dst_b_ptr.dtype.element_ty)
        tl.store(dst_b_ptr + slot * dst_stride + B_OFFSET + offs_b, b, mask=offs_b < WIDTH_B)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, ...] as [N, W] with unit inner stride (a view where the layout allows, e.g. V sliced out of QKV)."""
    flat = x.flatten(1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def write_cache_rows(a: torch.Tensor, b: torch.Tensor, dst_a: torch.Tensor, dst_b: torch.Tensor, b_offset: int,
                     rows: torch.Tensor, slots: torch.Tensor) -> None:
    """a [N, ...], b [N, ...] (flattened per row); dst_a, dst_b [num_slots, row width] contiguous;
    rows, slots [M] int64 (M written rows)."""
    a, b = _rows(a), _rows(b)
    if not (dst_a.is_contiguous() and dst_b.is_contiguous() and dst_a.stride(0) == dst_b.stride(0)):
        raise ValueError("cache destinations must be contiguous [num_slots, width] with the same row width")
    if a.shape[1] > dst_a.shape[1] or b_offset + b.shape[1] > dst_b.shape[1]:
        raise ValueError(f"rows of {a.shape[1]} and {b.shape[1]} values (at {b_offset}) do not fit cache rows of "
                         f"{dst_a.shape[1]}")
    if rows.numel() == 0:
        return
    _write_rows_kernel[(rows.numel(),)](
        a, b, dst_a, dst_b, rows, slots, a.stride(0), b.stride(0), dst_a.stride(0),
        B_OFFSET=b_offset, WIDTH_A=a.shape[1], WIDTH_B=b.shape[1],
        BLOCK_A=triton.next_power_of_2(a.shape[1]), BLOCK_B=triton.next_power_of_2(b.shape[1]),
        num_warps=4 if max(a.shape[1], b.shape[1]) <= 1024 else 8, **pdl.launch(a.is_cuda))
