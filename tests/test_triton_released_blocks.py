"""Attention over block tables whose entries behind a sliding window were released (model/engine/block_manager.py):
those entries point at a null block. The Triton kernels must never read it (their key loops start at the window),
so here it holds NaN and the output must still equal SDPA over the original tables; the SDPA paths do read it
(masked), which is why the engine's null blocks hold finite values: checked on the CPU with a zero block.

The kernels need a GPU (no Triton in CI); the SDPA checks run everywhere.
"""

import pytest

from tests.triton_fixtures import run_compiled

CHECK = """
import torch
from model.layers.paged_attention import _decode_mask, _prefill_mask, decode_attention, prefill_attention

def released(tables, lens, first_query, window, page, null):
    '''tables with every block wholly before the window of `first_query` (positions <= first_query - window)
    replaced by `null`.'''
    out = tables.clone()
    for b, q in enumerate(first_query):
        n_released = max(0, q - window + 1) // page
        out[b, :n_released] = null
    return out

def caches(num_blocks, page, kv_heads, dim, g, device, dtype, null_value):
    k = torch.randn(num_blocks + 1, page, kv_heads, dim, generator=g)
    v = torch.randn(num_blocks + 1, page, kv_heads, dim, generator=g)
    k[num_blocks], v[num_blocks] = null_value, null_value  # the null block: last
    return k.to(device, dtype), v.to(device, dtype)

def check_decode(lens, page, heads, kv_heads, dim, window, dtype, device, null_value, triton):
    from tests.triton_fixtures import scattered_block_tables
    g = torch.Generator().manual_seed(sum(lens) + page + window)
    tables, width, num_blocks = scattered_block_tables(lens, page, g)
    k, v = caches(num_blocks, page, kv_heads, dim, g, device, dtype, null_value)
    q = torch.randn(len(lens), heads, dim, generator=g).to(device, dtype)
    sinks = torch.randn(heads, generator=g).to(device, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = tables.to(device)
    cut = released(tables, lens, [n - 1 for n in lens], window, page, num_blocks)
    assert (cut != tables).any(), "the case releases nothing"
    mask = _decode_mask(lens_t, width * page, window)
    expected = decode_attention(q, k, v, tables, mask, dim ** -0.5, sinks)
    if triton:
        from model.layers.triton_decode_attention import paged_decode_attention
        actual = paged_decode_attention(q, k, v, cut, lens_t, dim ** -0.5, window, sinks=sinks)
    else:
        actual = decode_attention(q, k, v, cut, mask, dim ** -0.5, sinks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)

def check_prefill(n, context, page, heads, kv_heads, dim, window, dtype, device, null_value, triton):
    g = torch.Generator().manual_seed(n + context + page + window)
    num_blocks = (context + page - 1) // page
    tables = torch.randperm(num_blocks, generator=g).view(1, -1).to(device)
    k, v = caches(num_blocks, page, kv_heads, dim, g, device, dtype, null_value)
    q = torch.randn(n, heads, dim, generator=g).to(device, dtype)
    sinks = torch.randn(heads, generator=g).to(device, dtype)
    cut = released(tables, [context], [context - n], window, page, num_blocks)
    assert (cut != tables).any(), "the case releases nothing"
    mask = _prefill_mask(n, context, window, device)
    expected = prefill_attention(q, k, v, tables[0], context, mask, dim ** -0.5, sinks)
    if triton:
        from model.layers import triton_prefill_attention as tpa
        meta, tiles = tpa.chunk_tables([0], [n], [context], [0], tpa.block_m_for(dim), torch.device(device))
        actual = torch.empty_like(q)
        tpa.paged_prefill_attention(q, k, v, cut, meta, tiles, actual, dim ** -0.5, window, sinks=sinks)
    else:
        actual = prefill_attention(q, k, v, cut[0], context, mask, dim ** -0.5, sinks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
"""

DECODE = [([70, 33, 129], 4, 8, 2, 16, 8), ([200, 41], 16, 4, 1, 64, 17), ([300, 150], 16, 8, 2, 64, 128)]
PREFILL = [(9, 40, 4, 8, 2, 16, 8), (70, 300, 16, 4, 1, 64, 128), (5, 77, 16, 4, 4, 32, 17)]


def script(dtype: str, device: str, null_value: str, triton: bool) -> str:
    calls = [f"check_decode(*{c!r}, {dtype}, {device!r}, {null_value}, {triton})\n" for c in DECODE]
    calls += [f"check_prefill(*{c!r}, {dtype}, {device!r}, {null_value}, {triton})\n" for c in PREFILL]
    return CHECK + "".join(calls)


def test_sdpa_paths_with_a_finite_null_block_equal_the_unreleased_tables():
    exec(script("torch.float32", "cpu", "0.0", False), {})  # noqa: S102 (our own test code)


def test_sdpa_paths_need_the_null_block_finite():
    """Why the engine's null blocks are never NaN: the SDPA paths gather them, and 0 x NaN is NaN."""
    with pytest.raises(AssertionError):
        exec(script("torch.float32", "cpu", "float('nan')", False), {})  # noqa: S102


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_triton_kernels_never_read_released_blocks(dtype):
    run_compiled(script(dtype, "cuda", "float('nan')", True).replace("print('ok')", ""))
