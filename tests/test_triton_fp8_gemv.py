"""The decode FP8 linear (model/kernels/triton_fp8_gemv.py) on the CPU: its split-K plan, and the kernel itself under
Triton's interpreter (where Triton is installed) against `quantize_fp8_groups` bit for bit, the two-step path
(quantise, then `triton_fp8_gemm` at the same K-block order) bit for bit, and a float64 product within float32
accumulation (tests/fp8_gemv_checks.py). The real shapes on the GPU: tests/test_triton_fp8_gemv_gpu.py."""

import pytest

from model.kernels import triton_fp8_gemv
from model.kernels.triton_fp8_gemv import REDUCE_BUDGET, decode_plan
from tests.triton_fixtures import compile_for_sm90 as sm90_build
from tests.triton_fixtures import needs_triton, run_interpreted

REAL_SHAPES = {"qwen3 qkv": (5120, 2048), "qwen3 o": (2048, 4096), "dsv3 kv_a": (576, 7168),
               "dsv3 q_b": (24576, 1536), "dsv3 o": (7168, 16384)}

# (M, N, K, dtype, bias, block_n, splits): the plan's choice where block_n/splits are None
LINEAR_CASES = [
    (1, 576, 1792, "bfloat16", True, None, None),  # kv_a-like: N = 4.5 weight blocks, many splits
    (1, 96, 256, "float32", False, None, 1),  # one split: the plain store
    (3, 200, 512, "bfloat16", True, 64, 3),  # N not a multiple of the tile
    (5, 130, 640, "float16", True, 32, 5),  # one K block per split, a 2-column last tile
    (2, 48, 2048, "bfloat16", False, 16, 7),  # 7 splits: the reducer's 4-wide loop runs a ragged second round
    (16, 320, 1024, "float16", False, None, None),
    (16, 256, 1152, "float32", True, 128, 9),
    (33, 256, 512, "bfloat16", True, 64, 2),  # above the cut, BLOCK_M = 64: the kernel still right
    (64, 136, 384, "float32", False, 32, 3),
]


@pytest.mark.parametrize("name", REAL_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32, 64])
def test_plan_fills_the_gpu_within_the_reducer_budget(name, m):
    n, k = REAL_SHAPES[name]
    block_m, block_n, splits, per_split = decode_plan(m, n, k, num_sms=132)
    num_kb = k // 128
    assert block_m == max(16, 1 << (m - 1).bit_length()) and block_m >= m
    assert 128 % block_n == 0 and block_n >= 16
    assert per_split * (splits - 1) < num_kb <= per_split * splits  # K covered, no empty split
    assert splits == 1 or splits * m * block_n <= REDUCE_BUDGET
    programs = -(-n // block_n) * splits
    # >= 3/4 of 2 programs per SM wherever K blocks and the reducer's budget allow it at the narrowest tile
    reachable = -(-n // 32) * min(num_kb, max(1, REDUCE_BUDGET // (m * 32)))
    assert programs >= min(198, reachable // 2), (programs, reachable)


def test_plan_examples():
    """The numbers the module docstring and the report reason with (132 SMs)."""
    assert decode_plan(1, 576, 7168, 132) == (16, 64, 28, 2)  # kv_a: 9 tiles × 28 splits = 252 programs
    assert decode_plan(1, 5120, 2048, 132) == (16, 128, 6, 3)  # qkv: 40 × 6 = 240
    assert decode_plan(1, 2048, 4096, 132) == (16, 128, 16, 2)  # o: 16 × 16 = 256
    assert decode_plan(1, 24576, 1536, 132) == (16, 128, 2, 6)  # q_b: 192 × 2 = 384
    assert decode_plan(16, 576, 7168, 132)[1:3] == (32, 14)  # 18 × 14 = 252, 14 × 16 × 32 = 7168 floats reduced


def test_kernel_rejects_rows_beyond_its_tile():
    import torch

    with pytest.raises(ValueError, match="1..64 rows, got 65"):
        triton_fp8_gemv.fp8_decode_linear(torch.zeros(65, 128), None, None, None, torch.float32)


def script(device: str) -> str:
    lines = ["from tests.fp8_gemv_checks import *\n"]
    lines += [f"check_quantiser(torch.{d}, {device!r})\n" for d in ("bfloat16", "float16", "float32")]
    lines += [f"check_linear({m}, {n}, {k}, {d!r}, {b}, {device!r}, block_n={bn}, splits={s})\n"
              for m, n, k, d, b, bn, s in LINEAR_CASES]
    lines.append(f"check_dispatch({device!r})\n")
    # the same call twice: bitwise equal (the counters reset themselves)
    lines.append(f"a = check_linear(4, 320, 1536, 'bfloat16', True, {device!r}, seed=5)\n"
                 f"b = check_linear(4, 320, 1536, 'bfloat16', True, {device!r}, seed=5)\n"
                 "assert torch.equal(a, b)\n")
    return "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_matches_quantiser_two_step_path_and_float64():
    run_interpreted(script("cpu"))


def compile_for_sm90(block_m: int, block_n: int, split: bool):
    """The decode kernel compiled for sm_90a on this GPU-less machine, with the argument hints Triton's launcher
    gives the real shapes (pointers, N, K and M·N divisible by 16): (PTX, cuobjdump's resource line)."""
    names = ["x_ptr", "w_ptr", "ws_ptr", "bias_ptr", "out_ptr", "part_ptr", "count_ptr", "M", "N", "K", "num_kb",
             "kb_per_split", "split_stride"]
    types = ["*bf16", "*fp8e4nv", "*fp32", "*bf16", "*bf16", "*fp32", "*i32"] + ["i32"] * 6
    consts = dict(HAS_BIAS=True, SPLIT=split, SOFT_ROUND=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128)
    return sm90_build(triton_fp8_gemv._fp8_decode_gemm, names, types, consts, names[:7] + ["N", "K", "split_stride"],
                      num_warps=4, num_stages=3)


@needs_triton
@pytest.mark.parametrize("block_m, block_n, split", [(16, 128, True), (16, 64, True), (16, 32, True),
                                                     (16, 128, False), (64, 32, True)])
def test_compiles_for_sm90_without_spills(block_m, block_n, split):
    """What the plan picks up to the cut (and BLOCK_M = 64 for the benchmark's column): no local memory (spills),
    <= 168 registers (3 programs of 128 threads per SM), the acq_rel GPU-scope ticket and the reset when split,
    the hardware e4m3 conversion (round to nearest even, saturating)."""
    import re

    ptx, usage = compile_for_sm90(block_m, block_n, split)
    regs, local = int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))
    assert local == 0 and regs <= 168, usage
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert ("atom.global.gpu.acq_rel.add" in ptx and "atom.global.gpu.relaxed.exch" in ptx) == split
    assert "cp.async" in ptx  # the weight stream is pipelined
