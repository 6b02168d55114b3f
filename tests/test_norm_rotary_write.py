"""q/k norm + rotary + K/V cache write in one Triton launch (model/layers/triton_norm_rotary_write.py) on the CPU: the
kernel under Triton's interpreter against the unfused modules (bit for bit there: the interpreter sums the
statistics as torch does here), Attention.forward with and without it, the checks at its boundary, when Attention
takes it, and its sm_90a build. On the GPU: tests/test_norm_rotary_write_gpu.py."""

import pytest
import torch

from model.layers import triton_norm_rotary_write
from model.layers.triton_norm_rotary_write import norm_rotary_write
from tests.test_qk_norm_rotary import make_attention
from tests.triton_fixtures import compile_for_sm90, needs_triton, run_interpreted, switch_setter

# (N, Hq, Hkv, D, norm, rotary channels, dtype, padding row)
CASES = [(1, 4, 2, 32, "per_head", 32, "bfloat16", False), (5, 4, 2, 32, "full", 32, "bfloat16", False),
         (6, 4, 2, 64, "per_head", 32, "bfloat16", True),  # partial rotary (GLM-4.5 turns half of each head)
         (3, 2, 2, 16, "none", 16, "bfloat16", False), (7, 4, 1, 32, "full", 16, "float16", True),
         (2, 3, 1, 24, "per_head", 24, "bfloat16", False)]  # D not a power of two: masked lanes


def script() -> str:
    lines = ["from tests.norm_rotary_write_checks import check, check_layer\n"]
    lines += [f"check({n}, {hq}, {hkv}, {d}, {norm!r}, {r}, {dt!r}, pad={pad})\n"
              for n, hq, hkv, d, norm, r, dt, pad in CASES]
    lines += [f"check_layer({norm!r})\n" for norm in ("per_head", "full", "none")]
    lines.append("check_layer('per_head', rotary_dim=16)\n")
    return "".join(lines) + "print('ok')\n"


@needs_triton
def test_interpreted_kernel_and_layer_match_the_unfused_modules():
    run_interpreted(script())


def test_boundary_checks_name_what_is_wrong():
    qkv = torch.zeros(2, 8 * 16, dtype=torch.bfloat16)  # Hq 4, Hkv 2, D 16
    cos = sin = torch.zeros(2, 1, 16, dtype=torch.bfloat16)
    cache = torch.zeros(5, 2, 16, dtype=torch.bfloat16)
    rows = slots = torch.zeros(2, dtype=torch.int64)

    def call(qkv=qkv, cos=cos, sin=sin, k_cache=cache, hkv=2):
        return norm_rotary_write(qkv, 4, hkv, 16, "none", None, None, 0.0, cos, sin, k_cache, cache, rows, slots)

    with pytest.raises(ValueError, match=r"qkv must be 16-bit \[N, 128\]"):
        call(qkv=qkv.float())
    with pytest.raises(ValueError, match=r"qkv must be 16-bit \[N, 96\]"):
        call(hkv=1)
    with pytest.raises(ValueError, match="caches must be contiguous"):
        call(k_cache=torch.zeros(2, 5, 16, dtype=torch.bfloat16).transpose(0, 1))
    with pytest.raises(ValueError, match="an even R <= 16"):
        call(cos=torch.zeros(2, 1, 15, dtype=torch.bfloat16), sin=torch.zeros(2, 1, 15, dtype=torch.bfloat16))


class _CudaLike:
    """What `_one_launch_to_cache` reads of a CUDA qkv, on the CPU."""

    def __init__(self, dtype=torch.bfloat16):
        self.is_cuda, self.dtype = True, dtype


@pytest.fixture
def switch(monkeypatch):
    monkeypatch.setattr(triton_norm_rotary_write, "available", lambda: True)
    yield from switch_setter(monkeypatch, "STATICMOE_NORM_ROTARY_WRITE", triton_norm_rotary_write.enabled)


def test_attention_takes_it_only_where_it_computes_what_the_modules_do(switch):
    cache = torch.zeros(2, 3, 4, 2, 32, dtype=torch.bfloat16)
    per_head, full, none = (make_attention(n) for n in ("per_head", "full", "none"))
    switch(None)
    assert per_head._one_launch_to_cache(_CudaLike(), cache)  # the default
    switch("0")
    assert not per_head._one_launch_to_cache(_CudaLike(), cache)  # turned off
    switch("1")
    assert all(a._one_launch_to_cache(_CudaLike(), cache) for a in (per_head, full, none))
    assert not per_head._one_launch_to_cache(torch.zeros(1, 8), cache)  # the CPU
    assert not per_head._one_launch_to_cache(_CudaLike(torch.float32), cache.float())
    assert not per_head._one_launch_to_cache(_CudaLike(), cache.to(torch.float16))  # a cache of another dtype
    assert not make_attention("full", clip_qkv=0.5)._one_launch_to_cache(_CudaLike(), cache)
    switch("on")
    with pytest.raises(ValueError, match="STATICMOE_NORM_ROTARY_WRITE='on': want 0 or 1"):
        per_head._one_launch_to_cache(_CudaLike(), cache)


@needs_triton
@pytest.mark.parametrize("norm,hq,hkv", [(1, 32, 4), (2, 16, 16), (0, 64, 8)])  # Qwen3, OLMoE, gpt-oss
def test_compiles_for_sm90_without_spills(norm, hq, hkv):
    d = 64 if norm == 0 else 128
    ptx, usage = compile_for_sm90(
        triton_norm_rotary_write._norm_rotary_write,
        ["qkv_ptr", "row_stride", "q_w_ptr", "k_w_ptr", "cos_ptr", "sin_ptr", "cs_stride", "q_out_ptr",
         "k_cache_ptr", "v_cache_ptr", "rows_ptr", "slots_ptr", "eps"],
        ["*bf16", "i32", "*bf16", "*bf16", "*bf16", "*bf16", "i32", "*bf16", "*bf16", "*bf16", "*i64", "*i64",
         "fp32"],
        dict(HQ=hq, HKV=hkv, D=d, R=d, NORM=norm, BLOCK_D=d, BLOCK_ROW=hq * d if norm == 2 else 1,
             SOFT_ROUND=False),
        ["qkv_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr", "row_stride"], num_warps=4, enable_fp_fusion=False)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    # no contraction of a rounded product into an add: each op rounds where eager torch rounds (the H100 failed
    # the GPU test with `fma.rn.bf16` in the rotation)
    assert "fma." not in ptx, [line for line in ptx.splitlines() if "fma." in line][:4]
