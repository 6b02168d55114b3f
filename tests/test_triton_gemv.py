"""The 16-bit decode linear (model/kernels/triton_gemv.py) on the CPU: the kernel under Triton's interpreter against
a float64 product (tests/gemv_checks.py), its dispatch from `Linear` and the LM head (by shape or switch, decode
rows, 16-bit, a GPU), and its sm_90a build without spills. The real shapes on the GPU: tests/test_triton_gemv_gpu.py."""

import types

import pytest
import torch

from model.kernels import triton_gemv
from model.decoder import MoeCausalLM
from model.layers.linear import Linear
from tests.triton_fixtures import compile_for_sm90, needs_triton, run_interpreted, switch_setter

# (M, N, K, dtype, bias, block_n, splits): None = the plan's choice
CASES = [
    (1, 320, 1024, "bfloat16", False, None, None),  # the plan splits K
    (1, 96, 256, "bfloat16", True, None, 1),  # one split: the plain store
    (3, 200, 360, "bfloat16", True, 64, 2),  # K = 360: a masked last step (gpt-oss's 2880 is 22.5 steps)
    (5, 130, 640, "float16", True, 32, 5),  # one step per split, a 2-column last tile
    (2, 48, 2048, "bfloat16", False, 16, 7),  # 7 splits: the reducer's unrolled loop runs a ragged second round
    (16, 256, 1152, "float16", True, 128, 9),  # the row cut
]


def script() -> str:
    lines = ["from tests.gemv_checks import check_linear\n"]
    lines += [f"check_linear({m}, {n}, {k}, {d!r}, {b}, {bn}, {s})\n" for m, n, k, d, b, bn, s in CASES]
    return "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_the_float64_product():
    run_interpreted(script())


class _OnGpu:
    """What `applies` reads of a CUDA tensor, on the CPU."""

    def __init__(self, shape, dtype=torch.bfloat16):
        self.shape, self.dtype, self.is_cuda = shape, dtype, True

    def numel(self):
        return int(torch.tensor(self.shape).prod())


@pytest.fixture
def gemv_knob(monkeypatch):
    monkeypatch.setattr(triton_gemv, "triton", object())  # "Triton present", installed or not
    yield from switch_setter(monkeypatch, "STATICMOE_DECODE_GEMV", triton_gemv.forced)


def test_unset_it_takes_the_shapes_it_won_at(gemv_knob):
    """By shape (H100 bench_gemv, NOTES "Session 20"): Qwen3's o (K 4096) and an LM head (151936 × 2048) win, Qwen3's
    qkv (5120 × 2048) and OLMoE's o (2048 × 2048) lose; =0 turns the winners off, =1 takes the losers too."""
    gemv_knob(None)
    o, head = torch.empty(2048, 4096, dtype=torch.bfloat16), torch.empty(151936, 2048, dtype=torch.bfloat16)
    qkv, small_o = torch.empty(5120, 2048, dtype=torch.bfloat16), torch.empty(2048, 2048, dtype=torch.bfloat16)
    assert triton_gemv.applies(_OnGpu((1, 4096)), o) and triton_gemv.applies(_OnGpu((16, 2048)), head)
    assert not triton_gemv.applies(_OnGpu((1, 2048)), qkv) and not triton_gemv.applies(_OnGpu((1, 2048)), small_o)
    assert not triton_gemv.applies(_OnGpu((17, 2048)), head)  # prefill rows: cuBLAS
    gemv_knob("0")
    assert not triton_gemv.applies(_OnGpu((1, 4096)), o) and not triton_gemv.applies(_OnGpu((1, 2048)), head)
    gemv_knob("1")
    assert triton_gemv.applies(_OnGpu((1, 2048)), qkv)


def test_applies_when_switched_on_to_decode_rows_in_16_bit(gemv_knob):
    w = torch.empty(64, 2048, dtype=torch.bfloat16)
    gemv_knob("1")
    assert triton_gemv.applies(_OnGpu((1, 2048)), w)
    assert triton_gemv.applies(_OnGpu((4, 4, 2048)), w)  # 16 rows over two leading dims
    assert not triton_gemv.applies(_OnGpu((17, 2048)), w)  # beyond the row cut
    assert not triton_gemv.applies(_OnGpu((1, 2048), torch.float32), w.float())
    assert not triton_gemv.applies(_OnGpu((1, 2048), torch.float16), w)  # mixed dtypes
    assert not triton_gemv.applies(_OnGpu((1, 2044)), torch.empty(64, 2044, dtype=torch.bfloat16))  # K % 8
    assert not triton_gemv.applies(torch.zeros(1, 2048, dtype=torch.bfloat16), w)  # the CPU
    gemv_knob("yes")
    with pytest.raises(ValueError, match="STATICMOE_DECODE_GEMV='yes': want 0 or 1"):
        triton_gemv.applies(_OnGpu((1, 2048)), w)


def test_linear_and_the_lm_head_dispatch_to_it(gemv_knob, monkeypatch):
    gemv_knob("1")
    calls = []
    monkeypatch.setattr(triton_gemv, "applies", lambda x, w: True)
    monkeypatch.setattr(triton_gemv, "decode_linear", lambda x, w, b: calls.append(b) or torch.full((1, 3), 5.0))
    layer = Linear(4, 3, bias=True)
    out = layer(torch.randn(1, 4))
    assert torch.equal(out, torch.full((1, 3), 5.0)) and calls == [layer.bias]
    head = types.SimpleNamespace(head_weight=lambda: torch.randn(3, 4))  # MoeCausalLM.head reads only this
    logits = MoeCausalLM.head(head, torch.randn(1, 4))
    assert logits.dtype == torch.float32 and torch.equal(logits, torch.full((1, 3), 5.0)) and calls[-1] is None


def test_rejects_rows_beyond_the_cut():
    with pytest.raises(ValueError, match="1..16 rows, got 17"):
        triton_gemv.decode_linear(torch.zeros(17, 128), torch.zeros(8, 128))


def compile_decode_gemm(block_n: int, pdl: bool = False) -> tuple[str, str]:
    """`_decode_gemm` built for sm_90a at a split launch of BLOCK_N columns: (PTX, resource line)."""
    return compile_for_sm90(
        triton_gemv._decode_gemm,
        ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "part_ptr", "count_ptr", "M", "N", "K", "steps_per_split",
         "split_stride"],
        ["*bf16", "*bf16", "*bf16", "*bf16", "*fp32", "*i32", "i32", "i32", "i32", "i32", "i32"],
        dict(HAS_BIAS=True, SPLIT=True, SOFT_ROUND=False, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128),
        ["x_ptr", "w_ptr", "out_ptr", "part_ptr", "K", "N"], pdl=pdl, num_warps=4, num_stages=3)


@needs_triton
@pytest.mark.parametrize("block_n", [128, 64, 32])
def test_compiles_for_sm90_without_spills(block_n):
    _, usage = compile_decode_gemm(block_n)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
