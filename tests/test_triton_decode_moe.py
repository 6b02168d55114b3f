"""The two-launch decode MoE (model/kernels/triton_decode_moe.py) on the CPU: the kernels under Triton's interpreter
against a float64 loop (tests/decode_moe_checks.py), and `fused_moe`'s dispatch to it (opt-in, decode sizes,
16-bit only). Real shapes on the GPU: tests/test_triton_decode_moe_gpu.py."""

import pytest
import torch

from model.kernels import moe, triton_decode_moe
from tests.triton_fixtures import needs_triton, run_interpreted, switch_setter

# (T, E, H, I, k, dtype, activation, bias, bad ids, blocks): H and I scaled down for the interpreter, ragged against
# the kernels' blocks where it matters; blocks (BLOCK_I, BLOCK_H) None: `blocks_16bit`'s choice (4, 4 at these sizes)
CASES = [
    (1, 64, 256, 128, 8, "bfloat16", "silu", False, False, None),  # OLMoE-like, batch 1
    (1, 128, 256, 96, 8, "bfloat16", "silu", False, False, (32, 16)),  # Qwen3-like: I not a multiple of BLOCK_I
    (3, 32, 360, 360, 4, "bfloat16", "swiglu_oai", True, False, (16, 8)),  # gpt-oss-like: biases, H = I = 360
    (8, 8, 200, 72, 2, "float16", "silu", True, True, (8, 4)),  # Mixtral-like k = 2, ids outside [0, E) skipped
    (8, 64, 136, 40, 8, "bfloat16", "silu", False, True, (32, 16)),  # T·k = 64, the cut
]


# (T, E, H, I, k, activation, bias, bad ids, blocks) for the FP8 variant: H and I multiples of 128 (its contract)
FP8_CASES = [
    (1, 64, 256, 128, 8, "silu", False, False, None),  # (32, 8): GROUPS = 4 over 2 K blocks
    (3, 32, 384, 256, 4, "swiglu_oai", True, True, (8, 16)),  # 3 K blocks, GROUPS = 16: a partial step in `_up`
    (8, 8, 640, 128, 2, "silu", True, False, (16, 8)),  # 5 K blocks, GROUPS = 8
]


def script() -> str:
    lines = ["from tests.decode_moe_checks import *\n"]
    lines += [f"check({t}, {e}, {h}, {i}, {k}, {d!r}, {a!r}, {b}, {bad}, blocks={bl})\n"
              for t, e, h, i, k, d, a, b, bad, bl in CASES]
    # the sweep's smallest launch shapes (bench_decode_moe.py): half-size loop steps, 2 output columns, 4 warps
    lines.append("check(2, 16, 256, 96, 8, 'bfloat16', blocks=(4, 2), num_warps=4, tiles=(4096, 8192))\n")
    # the one-launch kernel (STATICMOE_DECODE_MOE_ONE_LAUNCH): the same cases' sums, its counters back at zero
    lines += [f"check({t}, {e}, {h}, {i}, {k}, {d!r}, {a!r}, {b}, {bad}, blocks={bl}, one_launch=True)\n"
              for t, e, h, i, k, d, a, b, bad, bl in CASES]
    lines.append("from model.kernels.triton_decode_moe import one_launch_counters\n"
                 "assert one_launch_counters(torch.device('cpu')).eq(0).all()\n")
    lines.append("check_deterministic()\n")
    lines += [f"check_fp8({t}, {e}, {h}, {i}, {k}, {a!r}, {b}, {bad}, blocks={bl})\n"
              for t, e, h, i, k, a, b, bad, bl in FP8_CASES]
    return "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernels_match_the_float64_layer():
    run_interpreted(script())


def test_launch_blocks_fill_the_gpu_at_batch_1_and_stay_wide_when_they_can():
    """Qwen3 (k 8, H 2048, I 768) on 132 SMs: at T = 1 the narrowest blocks (768 `_up` and 512 `_down` programs),
    at T = 8 the widest (1536 and 1024); FP8 keeps `_down` at >= 8 columns."""
    from model.kernels.triton_decode_moe import launch_blocks

    assert launch_blocks(1, 8, 2048, 768, 132) == (8, 4)
    assert launch_blocks(8, 8, 2048, 768, 132) == (32, 16)
    assert launch_blocks(1, 8, 2048, 768, 132, min_block_h=8) == (8, 8)
    assert launch_blocks(2, 2, 4096, 14336, 132) == (32, 8)  # Mixtral T = 2: 4 x 448 and 2 x 512 programs
    assert launch_blocks(1, 8, 7168, 2048, 132) == (16, 8)  # DeepSeek-V3: 8 x 128 and 896 programs


def test_16bit_blocks_take_the_narrow_up_blocks_the_h100_sweep_found_fastest():
    """The sweep's fastest `_up` blocks (benchmarks/NOTES.md "Session 20"): BLOCK_I 4 at T = 1 (Qwen3 and OLMoE:
    1536 and 2048 programs), 8 at T = 4 (3072 and 4096); `_down` as `launch_blocks` picks it."""
    from model.kernels.triton_decode_moe import blocks_16bit, launch_blocks

    assert blocks_16bit(1, 8, 2048, 768, 132) == (4, 4)  # Qwen3-30B-A3B
    assert blocks_16bit(4, 8, 2048, 768, 132) == (8, 8)
    assert blocks_16bit(1, 8, 2048, 1024, 132) == (4, 4)  # OLMoE
    assert blocks_16bit(4, 8, 2048, 1024, 132) == (8, 8)
    assert blocks_16bit(8, 8, 2048, 768, 132) == (16, 16)  # 64 slots: 3072 programs at 16 columns
    assert launch_blocks(1, 8, 2048, 768, 132, 8, min_block_i=32) == (32, 8)  # the FP8 layer's (FP8_BLOCK_I)


class FakeCuda:
    """Just what `applies` asks of x on a GPU: the dispatch test runs on the CPU."""

    def __init__(self, x):
        self.is_cuda, self.dtype, self.shape = True, x.dtype, x.shape


@pytest.fixture
def decode_knob(monkeypatch):
    monkeypatch.setattr(triton_decode_moe, "available", lambda: True)
    yield from switch_setter(monkeypatch, "STATICMOE_DECODE_MOE", triton_decode_moe.decode_moe_forced)


def test_by_default_applies_to_small_experts_only(decode_knob):
    """OLMoE's experts (H·I = 2048·1024) and smaller take it; Qwen3-235B's (4096·1536, measured no faster) do not,
    unless forced; `=0` keeps even the smallest on the CUDA layer."""
    ids = torch.zeros(1, 8, dtype=torch.int32)
    x = FakeCuda(torch.zeros(1, 2048, dtype=torch.bfloat16))
    olmoe = torch.empty(64, 2 * 1024, 2048, dtype=torch.bfloat16, device="meta")
    one_column_more = torch.empty(64, 2 * 1025, 2048, dtype=torch.bfloat16, device="meta")
    big = torch.empty(128, 2 * 1536, 4096, dtype=torch.float8_e4m3fn, device="meta")
    big_x = FakeCuda(torch.zeros(1, 4096, dtype=torch.bfloat16))
    decode_knob(None)
    assert triton_decode_moe.applies(x, olmoe, ids)
    assert not triton_decode_moe.applies(x, one_column_more, ids)
    assert not triton_decode_moe.applies(big_x, big, ids)
    decode_knob("1")
    assert triton_decode_moe.applies(big_x, big, ids)
    decode_knob("0")
    assert not triton_decode_moe.applies(x, olmoe, ids)


def test_applies_only_at_decode_sizes_in_16_bit_or_fp8(decode_knob):
    w13 = torch.zeros(4, 8, 16, dtype=torch.bfloat16)
    x = FakeCuda(torch.zeros(1, 16, dtype=torch.bfloat16))
    ids = torch.zeros(1, 8, dtype=torch.int32)
    decode_knob("1")
    assert triton_decode_moe.applies(x, w13, ids)
    assert triton_decode_moe.applies(x, w13, torch.zeros(8, 8, dtype=torch.int32))  # T·k = 64
    assert not triton_decode_moe.applies(x, w13, torch.zeros(9, 8, dtype=torch.int32))  # 72 slots
    assert not triton_decode_moe.applies(FakeCuda(torch.zeros(1, 16)), w13.float(), ids)  # float32
    assert not triton_decode_moe.applies(torch.zeros(1, 16, dtype=torch.bfloat16), w13, ids)  # the CPU
    decode_knob("0")
    assert not triton_decode_moe.applies(x, w13, ids)
    decode_knob("on")
    with pytest.raises(ValueError, match="STATICMOE_DECODE_MOE='on': want 0 or 1"):
        triton_decode_moe.applies(x, w13, ids)


def test_fused_moe_dispatches_to_it(decode_knob, monkeypatch):
    """With the switch on and `applies` true, the op returns the decode path's result and skips the CUDA kernel."""
    decode_knob("1")
    calls = []
    monkeypatch.setattr(triton_decode_moe, "applies", lambda x, w13, ids: True)
    monkeypatch.setattr(triton_decode_moe, "decode_moe",
                        lambda x, *args: calls.append(args[-3]) or torch.full_like(x, 3.0))
    monkeypatch.setattr(moe.extension, "fused_moe_cuda", lambda *a, **k: pytest.fail("the CUDA path ran"))
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    out = moe.fused_moe(x, torch.randn(4, 16, 16, dtype=torch.bfloat16), torch.randn(4, 16, 8, dtype=torch.bfloat16),
                        torch.ones(1, 2), torch.tensor([[0, 1]], dtype=torch.int32), activation="swiglu_oai")
    assert torch.equal(out, torch.full_like(x, 3.0)) and calls == [moe.Activation.SWIGLU_OAI]


@needs_triton
@pytest.mark.parametrize("tiles", [(8192, 16384), (4096, 8192)])
@pytest.mark.parametrize("block_i", [4, 8])
def test_one_launch_compiles_for_sm90_with_its_release_and_acquire(tiles, block_i):
    """Qwen3's T = 1 launch shapes (BLOCK_I 4 is `blocks_16bit`'s): no spills; each `_up` program's signal is a
    GPU-scope release, each `_down` program's wait polls with GPU-scope acquire loads (LLVM turns the
    `atomic_add(ptr, 0)` into them)."""
    from tests.triton_fixtures import compile_for_sm90

    ptx, usage = compile_for_sm90(
        triton_decode_moe._one_launch,
        ["x_ptr", "w13_ptr", "b13_ptr", "h_ptr", "w2_ptr", "b2_ptr", "ids_ptr", "wts_ptr", "out_ptr", "load_ptr",
         "count_ptr", "T", "E", "H", "I"],
        ["*bf16"] * 6 + ["*i32", "*fp32", "*bf16", "*i64", "*i32", "i32", "i32", "i32", "i32"],
        dict(K_SLOTS=8, K_PAD=8, HAS_BIAS=False, COUNT=True, SWIGLU_OAI=False, alpha=1.702, limit=7.0,
             BLOCK_I=block_i, UP_BLOCK_K=tiles[0] // block_i, BLOCK_H=4, DOWN_BLOCK_K=tiles[1] // 32),
        ["x_ptr", "w13_ptr", "h_ptr", "w2_ptr", "out_ptr", "H", "I"], num_warps=8)
    assert "LOCAL:0" in usage, usage
    assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
    assert "ld.global.gpu.acquire" in ptx or "atom.global.gpu.acquire" in ptx
