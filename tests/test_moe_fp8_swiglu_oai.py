"""The FP8 op with gpt-oss's clamped SwiGLU and expert biases (CPU path) against a float64 loop written here from the
formula and the FP8 contract (x and h quantised per 128 columns, weights dequantised per 128x128 block, biases added
to the float GEMM outputs), with the independent e4m3 quantiser of test_moe_fp8.py."""

import math

import pytest
import torch

from model.kernels import fused_moe
from model.kernels.fp8 import fused_moe_fp8_reference
from tests.test_moe_fp8 import block_index_scale, fp8_problem, own_group_qdq, relative_error

SHAPES = [(1, 4, 1, 128, 128), (9, 8, 4, 256, 128), (33, 16, 4, 128, 256)]


def oai(g: float, u: float) -> float:
    g, u = min(g, 7.0), max(-7.0, min(u, 7.0))
    return (u + 1.0) * g / (1.0 + math.exp(-1.702 * g))


def float64_fp8_oai_moe(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, b13, b2):
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        xt = own_group_qdq(x[t])
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            deq13 = w13[e].double() * block_index_scale(w13_scale[e].double(), two_i, H)
            deq2 = w2[e].double() * block_index_scale(w2_scale[e].double(), H, inter)
            gate_up = deq13 @ xt + b13[e].double()
            h = torch.tensor([oai(g, u) for g, u in zip(gate_up[:inter].tolist(), gate_up[inter:].tolist())],
                             dtype=torch.float64)
            out[t] += float(topk_weights[t, s]) * (deq2 @ own_group_qdq(h.float()) + b2[e].double())
    return out


def biases(E, H, I, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(E, 2 * I, generator=g)).to(dtype), torch.randn(E, H, generator=g).to(dtype)


@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_fp8_reference_with_swiglu_oai_and_biases_matches_float64_loop(T, E, k, H, I):
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T + E, x_dtype=torch.float32)
    b13, b2 = biases(E, H, I, T, torch.float32)  # biases ~3: many gate/up values pass the clamp limit
    out = fused_moe_fp8_reference(x, w13, w13_s, w2, w2_s, tw, ids, compute_dtype=torch.float64,
                                  activation="swiglu_oai", w13_bias=b13, w2_bias=b2)
    err = relative_error(out, float64_fp8_oai_moe(x, w13, w13_s, w2, w2_s, tw, ids, b13, b2))
    assert err <= 1e-7, f"relative error {err:.2e}"


@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_fused_moe_fp8_with_swiglu_oai_and_biases_as_served(T, E, k, H, I):
    """bf16 x and biases, float32 compute, bf16 output: the bf16 rounding dominates (as for SiLU, <= 3e-3)."""
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T * 3 + E)
    b13, b2 = biases(E, H, I, T + 1, torch.bfloat16)
    out = fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s, activation="swiglu_oai", w13_bias=b13,
                    w2_bias=b2)
    assert out.dtype == torch.bfloat16
    err = relative_error(out, float64_fp8_oai_moe(x, w13, w13_s, w2, w2_s, tw, ids, b13, b2))
    assert err <= 3e-3, f"relative error {err:.2e}"
    silu = fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert relative_error(silu, out) > 0.1  # the activation and biases were applied


def test_fp8_bias_must_be_bf16_like_x():
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(3, 4, 2, 128, 128, seed=1)
    with pytest.raises(TypeError, match="w2_bias.dtype torch.float32 differs from x.dtype"):
        fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s, w2_bias=torch.zeros(4, 128))


def test_fp8_custom_op_with_activation_and_biases_passes_opcheck():
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(6, 4, 2, 128, 128, seed=2)
    b13, b2 = biases(4, 128, 128, 3, torch.bfloat16)
    args = (x, w13, w13_s, w2, w2_s, tw, ids, torch.zeros(4, dtype=torch.int64), "swiglu_oai", b13, b2)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # as test_moe_fp8.py:
    results = torch.library.opcheck(torch.ops.staticmoe.fused_moe_fp8.default, args, test_utils=utils)  # no e4m3 mul
    assert results == {u: "SUCCESS" for u in utils}, results
