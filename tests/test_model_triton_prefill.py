"""The Triton paged prefill-attention kernel against the per-chunk SDPA path (itself checked against HF in the parity
tests), on steps of several chunks: whole prompts, chunks after cached context, chunks that cross tile edges,
grouped-query heads, sliding windows; rows of the step that are not prefill rows must be left untouched.

On the CPU it runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because the flag must be set
before the kernel is defined); skipped where Triton is not installed. On the GPU it runs compiled, in bf16 too.
"""

import pytest
import torch

from tests.triton_fixtures import needs_triton, run_compiled, run_interpreted

CASES = [  # ((new tokens, context length) per chunk, block size, query heads, kv heads, head dim, sliding window)
    ([(5, 5), (70, 70), (2, 9)], 4, 8, 2, 16, None),
    ([(64, 64), (65, 130), (3, 200)], 16, 4, 4, 64, None),
    ([(40, 100), (129, 129)], 8, 6, 3, 32, 17),
    ([(7, 7)], 16, 2, 1, 128, None),
    ([(300, 300), (33, 50)], 16, 8, 1, 64, 100),
]

CHECK = """
import torch
from model.layers.paged_attention import prefill_attention, _prefill_mask
from model.layers import triton_prefill_attention as tpa

def check(chunks, page, heads, kv_heads, dim, window, dtype, device, with_sinks=False):
    g = torch.Generator().manual_seed(sum(n + c for n, c in chunks) + page + dim)
    blocks_per_seq = [(c + page - 1) // page for _, c in chunks]
    width = max(blocks_per_seq) + 2  # tables padded past the sequences' own blocks
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    seqs = [1 + 2 * i for i in range(len(chunks))]  # the chunks' sequences sit among decode-only rows of the table
    tables = torch.zeros(2 * len(chunks) + 1, width, dtype=torch.int64)
    for s, n in zip(seqs, blocks_per_seq):
        tables[s, :n] = torch.tensor([order.pop() for _ in range(n)])
    k = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    rows, row = [], 3  # three rows before the first chunk stand for decode rows of a mixed step
    for n, _ in chunks:
        rows.append(row)
        row += n + 1  # and one between chunks
    q = torch.randn(row, heads, dim, generator=g).to(device, dtype)
    tables = tables.to(device)
    scale = dim ** -0.5
    sinks = (2 * torch.randn(heads, generator=g)).to(device, dtype) if with_sinks else None
    poison = torch.full_like(q, float("nan"))
    expected = poison.clone()
    for r, (n, c), s in zip(rows, chunks, seqs):
        blocks = tables[s, : (c + page - 1) // page]
        expected[r : r + n] = prefill_attention(q[r : r + n], k, v, blocks, c, _prefill_mask(n, c, window, device),
                                                scale, sinks)
    meta, tiles = tpa.chunk_tables(rows, [n for n, _ in chunks], [c for _, c in chunks], seqs,
                                   tpa.block_m_for(dim), torch.device(device))
    actual = poison.clone()
    tpa.paged_prefill_attention(q, k, v, tables, meta, tiles, actual, scale, window, sinks=sinks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)  # other rows still NaN
    assert not actual[rows[0]].isnan().any()
"""


def cases_script(dtype: str, device: str) -> str:
    checks = [f"check(*{case!r}, {dtype}, {device!r}, {sinks})\n" for case in CASES for sinks in (False, True)]
    return CHECK + "".join(checks) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_sdpa_on_cpu():
    run_interpreted(cases_script("torch.float32", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16", "torch.float16"])
def test_compiled_kernel_matches_sdpa_on_gpu(dtype):
    run_compiled(cases_script(dtype, "cuda"))


def test_a_failing_kernel_falls_back_to_sdpa(monkeypatch, caplog):
    """If the Triton prefill kernel cannot be built on a machine, the step still runs (SDPA) and later steps skip
    Triton; the logits are those of the SDPA path."""
    from model.layers import paged_attention
    from model.loader import load_model
    from tests.model_fixtures import PagedRunner

    model, _ = load_model("tiny", dtype=torch.float32)
    prompts = {"a": [1, 2, 3, 9, 4], "b": [4, 5, 6]}
    expected = PagedRunner(model).step(prompts)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(paged_attention._TRITON, "prefill", True)
    monkeypatch.setattr(paged_attention, "triton_prefill_enabled", lambda device: paged_attention._TRITON["prefill"])
    monkeypatch.setattr(paged_attention.triton_prefill_attention, "paged_prefill_attention", broken)
    with caplog.at_level("WARNING"):
        actual = PagedRunner(model).step(prompts)
    assert calls == [1] and not paged_attention._TRITON["prefill"]
    assert "Triton prefill attention failed" in caplog.text
    for key in prompts:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
