"""The Triton paged MLA decode kernel (model/layers/triton_mla_decode.py) against the pure-torch reference
(model/layers/mla_decode.py, itself checked against transformers in tests/test_mla_attention.py).

On the CPU it runs under Triton's interpreter where Triton is installed (small cases); on the GPU compiled, at
DeepSeek's real widths (kv_lora_rank 512, rope 64), batch 1 and 64, contexts up to 4096, in fp32 and bf16.
"""

import pytest

from tests.triton_fixtures import needs_triton, run_compiled, run_interpreted

CHECK = """
import torch
from tests.triton_fixtures import scattered_block_tables
from model.layers.mla_decode import mla_decode_reference
from model.layers.paged_attention import _decode_mask
from model.layers.triton_mla_decode import MlaKernelConfig, paged_mla_decode

def check(lens, page, heads, rank, rope, dtype, device, splits=None, block_h=None, num_warps=4):
    g = torch.Generator().manual_seed(sum(lens) + page + heads)
    tables, width, num_blocks = scattered_block_tables(lens, page, g)
    cache = torch.randn(num_blocks, page, rank + rope, generator=g).to(device, dtype)
    q = torch.randn(len(lens), heads, rank + rope, generator=g).to(device, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    tables = tables.to(device)
    scale = 0.7 / (rank + rope) ** 0.5
    mask = _decode_mask(lens_t, width * page, None)
    expected = mla_decode_reference(q.double(), cache.double(), tables, mask, scale, rank)
    config = None if block_h is None else MlaKernelConfig(block_h=block_h, num_warps=num_warps)  # None: by heads
    actual = paged_mla_decode(q, cache, tables, lens_t, scale, rank, splits, config)
    assert actual.shape == (len(lens), heads, rank) and actual.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)
"""

SMALL = [  # (context lengths, block size, heads, kv_lora_rank, rope, key splits[, heads per program, warps])
    ([1, 7, 33, 70], 4, 4, 32, 16, 1),
    ([5, 64, 65], 16, 16, 64, 16, 1),
    ([3, 100, 40], 8, 20, 32, 16, 3),  # heads past one program's 16; splits past a short sequence's keys see none
    ([3, 100, 40], 8, 20, 32, 16, 3, 32),  # 20 heads in one program of 32 rows
    ([9, 50], 4, 40, 32, 16, 1, 32),  # two programs of 32, the second one part empty
    ([130], 16, 2, 16, 16, 4),
]
REAL = [  # DeepSeek's widths: V2-Lite's 16 heads, V3's 128 (per GPU without tensor parallelism)
    ([4096], 64, 16, 512, 64, None),
    ([4096] * 64, 64, 16, 512, 64, None),
    ([1, 17, 1000, 4095, 2048, 64, 3000, 4096] * 8, 64, 16, 512, 64, None),
    ([4096], 16, 128, 512, 64, None),  # V3's heads, the default launch (64 per program)
    ([700, 33, 4096, 1], 64, 128, 512, 64, 1),
    ([4096] * 4, 64, 16, 512, 64, 8),
    ([700, 33, 4096, 1], 64, 128, 512, 64, None, 64, 8),  # V3's heads, 64 per program
    ([4096] * 8, 64, 128, 512, 64, None, 32, 8),
    ([300, 4096], 64, 128, 512, 64, None, 16),  # 16 per program, 8 programs per sequence
]


def script(cases, dtype: str, device: str) -> str:
    lines = [f"check(*{case[:5]!r}, {dtype}, {device!r}, *{case[5:]!r})\n" for case in cases]
    return CHECK + "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_the_reference_on_cpu():
    run_interpreted(script(SMALL, "torch.float32", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_compiled_kernel_matches_the_reference_on_gpu(dtype):
    run_compiled(script(SMALL + REAL, dtype, "cuda"))


MODEL_CHECK = """
import tempfile
from pathlib import Path
import torch
from model.layers import mla_decode, triton_mla_decode
from model.loader import load_model
from tests.deepseek_fixtures import make_deepseek_model
from tests.model_fixtures import assert_paged_matches_hf, save_checkpoint

calls = []
kernel = triton_mla_decode.paged_mla_decode
def counting(*args, **kwargs):
    calls.append(1)
    return kernel(*args, **kwargs)
mla_decode.triton_mla_enabled = lambda q, rank, rope: True  # the kernel on the CPU, interpreted
triton_mla_decode.paged_mla_decode = counting
PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
for variant in ("v2-lite", "v3-yarn"):
    hf = make_deepseek_model(variant, seed=3)
    ours, _ = load_model(str(save_checkpoint(hf, Path(tempfile.mkdtemp()))), dtype=torch.float32)
    assert_paged_matches_hf(ours, hf, PROMPT)
assert calls
print('ok')
"""


@needs_triton
def test_interpreted_kernel_inside_the_model_matches_transformers():
    """The model's absorbed decode through the kernel (interpreted) gives transformers' logits and greedy tokens."""
    run_interpreted(MODEL_CHECK)
