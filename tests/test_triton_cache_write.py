"""Writing a step's K/V rows into the paged cache (model/layers/triton_cache_write.py and the torch path in
model/layers/paged_attention.py `write_cache_rows`) against a row-by-row Python copy: GQA (K, and V sliced out of a
fused QKV row, two caches), MLA (latent and rope key into one cache row), padding rows that re-write a real row,
casts to the cache dtype, and an empty step. The Triton kernel runs interpreted on the CPU where Triton is
installed, compiled on the GPU."""

import pytest
import torch

from tests.triton_fixtures import needs_triton, run_compiled, run_interpreted

CHECK = """
import torch
from model.layers.paged_attention import write_cache_rows as dispatched
from model.layers.triton_cache_write import write_cache_rows as kernel

def expected_after(dst_a, dst_b, a, b, b_offset, rows, slots):
    dst_a, dst_b = dst_a.clone(), dst_b.clone() if dst_b.data_ptr() != dst_a.data_ptr() else None
    dst_b = dst_a if dst_b is None else dst_b
    for row, slot in zip(rows.tolist(), slots.tolist()):
        dst_a[slot, : a[0].numel()] = a[row].flatten().to(dst_a.dtype)
        dst_b[slot, b_offset : b_offset + b[0].numel()] = b[row].flatten().to(dst_b.dtype)
    return dst_a, dst_b

def check(write, device, n, heads, dim, src_dtype, cache_dtype, mla):
    g = torch.Generator().manual_seed(n * 7 + heads + dim)
    num_slots = 3 * n + 5
    real = torch.randperm(num_slots, generator=g)[:n]
    rows = torch.arange(n)
    if n > 2:  # the last row pads: it re-writes row 0 to row 0's slot (AttentionPlan.build)
        rows[-1], real[-1] = 0, real[0]
    rows, slots = rows.to(device), real.to(device)
    if mla:  # latent [N, r] and rope key [N, 1, rope] into one cache row [r + rope]
        a = torch.randn(n, heads * dim, generator=g).to(device, src_dtype)
        b = torch.randn(n, 1, dim, generator=g).to(device, src_dtype)
        dst_a = torch.randn(num_slots, heads * dim + dim, generator=g).to(device, cache_dtype)
        dst_b, b_offset = dst_a, heads * dim
    else:  # K [N, Hkv, D] and V sliced out of a fused [N, (2 Hkv + 1) D] row: a strided view
        qkv = torch.randn(n, (2 * heads + 1) * dim, generator=g).to(device, src_dtype)
        a = qkv[:, dim : dim + heads * dim].view(n, heads, dim).contiguous()
        b = qkv[:, dim + heads * dim :].view(n, heads, dim)
        dst_a = torch.randn(num_slots, heads * dim, generator=g).to(device, cache_dtype)
        dst_b, b_offset = torch.randn(num_slots, heads * dim, generator=g).to(device, cache_dtype), 0
    want_a, want_b = expected_after(dst_a, dst_b, a, b, b_offset, rows, slots)
    write(a, b, dst_a, dst_b, b_offset, rows, slots)
    assert torch.equal(dst_a, want_a) and torch.equal(dst_b, want_b), (n, heads, dim, src_dtype, cache_dtype, mla)

CASES = [(1, 2, 16, torch.float32, torch.float32, False), (7, 4, 64, torch.bfloat16, torch.bfloat16, False),
         (5, 3, 24, torch.float32, torch.bfloat16, False), (6, 8, 64, torch.bfloat16, torch.bfloat16, True),
         (0, 2, 16, torch.float32, torch.float32, False), (9, 1, 64, torch.float32, torch.float32, True)]
"""


def script(device: str, which: str, extra: str = "") -> str:
    return CHECK + extra + f"for case in CASES:\n    check({which}, {device!r}, *case)\nprint('ok')\n"


# Triton's interpreter rounds fp32 -> bf16 its own way (seen: 0.0156 off torch's round-to-nearest-even); compiled,
# a downcast rounds to nearest even (Triton's default), as torch does, so the casting case runs on the GPU only
SAME_DTYPE = "CASES = [case for case in CASES if case[3] == case[4]]\n"


def test_torch_path_matches_a_row_by_row_copy():
    namespace = {}
    exec(CHECK, namespace)  # noqa: S102 (our own test code)
    for case in namespace["CASES"]:
        namespace["check"](namespace["dispatched"], "cpu", *case)


def test_check_fails_on_a_wrong_write():
    """The comparison above can fail: a write that drops the padding row's duplicate... and one that skips V."""
    namespace = {}
    exec(CHECK, namespace)  # noqa: S102

    def skips_v(a, b, dst_a, dst_b, b_offset, rows, slots):
        dst_a[:, : a[0].numel()].index_copy_(0, slots, a.flatten(1)[rows].to(dst_a.dtype))

    with pytest.raises(AssertionError):
        namespace["check"](skips_v, "cpu", 7, 4, 64, torch.float32, torch.float32, False)


@needs_triton
def test_interpreted_kernel_matches_a_row_by_row_copy():
    run_interpreted(script("cpu", "kernel", SAME_DTYPE))


@pytest.mark.gpu
def test_compiled_kernel_and_dispatch_match_on_gpu():
    extra = ("CASES += [(64, 8, 128, torch.bfloat16, torch.bfloat16, False), (256, 4, 128, torch.bfloat16, "
             "torch.bfloat16, False), (64, 4, 128, torch.bfloat16, torch.bfloat16, True)]  # olmoe/qwen3/MLA 512+64\n")
    run_compiled(script("cuda", "kernel", extra))
    run_compiled(script("cuda", "dispatched", extra))
    from model.layers import paged_attention
    assert paged_attention._TRITON["cache_write"], "the Triton write did not fall back"
