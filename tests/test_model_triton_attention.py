"""The Triton paged decode-attention kernel against the SDPA path (itself checked against HF in the parity tests).

On the CPU it runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because the flag must be set
before the kernel is defined); skipped where Triton is not installed. On the GPU it runs compiled, in bf16 too.
"""

import pytest
import torch

from tests.triton_fixtures import needs_triton, run_compiled, run_interpreted

CASES = [  # (context lengths, block size, query heads, kv heads, head dim, sliding window, key splits)
    ([1, 7, 33, 70, 16], 4, 8, 2, 16, None, 1),
    ([5, 64, 65, 130], 16, 4, 4, 64, None, 1),
    ([9, 40, 1, 77], 16, 16, 2, 32, 12, 1),
    ([3, 100], 8, 6, 3, 16, 5, 1),
    ([1, 7, 33, 200, 16], 4, 8, 2, 16, None, 3),  # splits past a short sequence's keys see none
    ([9, 140, 1, 77], 16, 16, 2, 32, 70, 4),  # window: the early splits see no key
    ([300], 16, 8, 1, 64, None, 5),
]

CHECK = """
import torch
from tests.triton_fixtures import scattered_block_tables
from model.layers.paged_attention import _decode_mask, decode_attention
from model.layers.triton_decode_attention import paged_decode_attention

def check(lens, page, heads, kv_heads, dim, window, dtype, device, splits=None, with_sinks=False):
    g = torch.Generator().manual_seed(sum(lens) + page)
    tables, width, num_blocks = scattered_block_tables(lens, page, g)
    k = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(device, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = tables.to(device)
    scale = dim ** -0.5
    sinks = (2 * torch.randn(heads, generator=g)).to(device, dtype) if with_sinks else None
    expected = decode_attention(q, k, v, tables, _decode_mask(lens_t, width * page, window), scale, sinks)
    actual = paged_decode_attention(q, k, v, tables, lens_t, scale, window, splits, sinks=sinks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
"""


def cases_script(dtype: str, device: str) -> str:
    checks = [f"check(*{case[:-1]!r}, {dtype}, {device!r}, {case[-1]}, {sinks})\n"
              for case in CASES for sinks in (False, True)]
    if device == "cuda":  # and the splits the kernel picks for a GPU
        checks += [f"check(*{case[:-1]!r}, {dtype}, {device!r})\n" for case in CASES]
    return CHECK + "".join(checks) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_sdpa_on_cpu():
    run_interpreted(cases_script("torch.float32", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16", "torch.float16"])
def test_compiled_kernel_matches_sdpa_on_gpu(dtype):
    run_compiled(cases_script(dtype, "cuda"))


def test_a_failing_kernel_falls_back_to_sdpa(monkeypatch, caplog):
    """If the Triton kernel cannot be built on a machine, the step still runs (SDPA) and later steps skip Triton."""
    from model.layers import paged_attention
    from model.loader import load_model
    from tests.model_fixtures import PagedRunner

    model, _ = load_model("tiny", dtype=torch.float32)
    runner = PagedRunner(model)
    runner.step({"a": [1, 2, 3], "b": [4, 5]})
    expected = PagedRunner.split(model(*runner.prepare({"a": [6], "b": [7]})[:1], runner.kv_cache.clone()),
                                 {"a": [0], "b": [1]})
    runner.seqs = {k: dict(v, len=v["len"] - 1) for k, v in runner.seqs.items()}
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(paged_attention._TRITON, "decode", True)
    monkeypatch.setattr(paged_attention, "triton_decode_enabled", lambda device: paged_attention._TRITON["decode"])
    monkeypatch.setattr(paged_attention.triton_decode_attention, "paged_decode_attention", broken)
    with caplog.at_level("WARNING"):
        actual = runner.step({"a": [6], "b": [7]})
    assert calls == [1] and not paged_attention._TRITON["decode"]
    assert "Triton decode attention failed" in caplog.text
    for key in ("a", "b"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
