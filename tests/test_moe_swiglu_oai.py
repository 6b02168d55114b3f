"""`fused_moe` with gpt-oss's clamped SwiGLU and expert biases (CPU path) against a float64 loop over tokens and
slots written here from the formula (not from the code under test), and the boundary's checks of the new arguments."""

import math

import pytest
import torch

from benchmarks.moe_cases import relative_error
from model.kernels import fused_moe
from model.kernels.activation import Activation
from tests.test_moe_reference import float64_token_slot_sum, random_problem


def float64_oai_moe(x, w13, w2, topk_weights, topk_ids, b13, b2):
    """out[t] = Σ_s w[t,s] · (W2[e] h + b2[e]); h = (clamp(u,±7)+1) · min(g,7) · σ(1.702 · min(g,7))."""
    inter = w2.shape[2]

    def expert(e, xt):
        gate = (w13[e, :inter].double() @ xt + b13[e, :inter].double()).tolist()
        up = (w13[e, inter:].double() @ xt + b13[e, inter:].double()).tolist()
        h = []
        for g, u in zip(gate, up):
            g, u = min(g, 7.0), max(-7.0, min(u, 7.0))
            h.append((u + 1.0) * g / (1.0 + math.exp(-1.702 * g)))
        return w2[e].double() @ torch.tensor(h, dtype=torch.float64) + b2[e].double()

    return float64_token_slot_sum(x, topk_weights, topk_ids, expert)


def oai_problem(T, E, k, H, I, dtype, seed, scale=8.0):
    """Weights scaled up so many gate/up values lie beyond the clamp limit of 7 (the clamp really acts)."""
    x, w13, w2, tw, ids = random_problem(T, E, k, H, I, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w13 = (w13.float() * scale).to(dtype)
    b13 = torch.randn(E, 2 * I, generator=g).to(dtype)
    b2 = torch.randn(E, H, generator=g).to(dtype)
    return x, w13, w2, tw, ids, b13, b2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("T,E,k,H,I", [(1, 4, 1, 8, 8), (9, 8, 4, 32, 24), (40, 32, 4, 16, 16)])
def test_swiglu_oai_with_biases_matches_float64_loop(dtype, tol, T, E, k, H, I):
    x, w13, w2, tw, ids, b13, b2 = oai_problem(T, E, k, H, I, dtype, seed=T + E)
    gate_up = torch.einsum("th,eih->tei", x.double(), w13.double())
    assert (gate_up.abs() > 7).float().mean() > 0.05  # the clamp matters in this problem
    out = fused_moe(x, w13, w2, tw, ids, activation="swiglu_oai", w13_bias=b13, w2_bias=b2)
    assert out.shape == (T, H) and out.dtype == dtype
    assert relative_error(out, float64_oai_moe(x, w13, w2, tw, ids, b13, b2)) <= tol


def test_w2_bias_is_scaled_by_the_routing_weight():
    """With zero weights everywhere the output is Σ_s w[t,s] · b2[e]: the bias is weighted like the product."""
    x, w13, w2, tw, ids, b13, b2 = oai_problem(5, 4, 2, 8, 8, torch.float32, seed=2)
    out = fused_moe(x, torch.zeros_like(w13), torch.zeros_like(w2), tw, ids, activation=Activation.SWIGLU_OAI,
                    w13_bias=b13, w2_bias=b2)
    expected = (tw[:, :, None] * b2[ids.long()]).sum(1)
    torch.testing.assert_close(out, expected)


def test_silu_default_and_no_biases_unchanged():
    x, w13, w2, tw, ids, _, _ = oai_problem(7, 8, 2, 16, 8, torch.float32, seed=3, scale=1.0)
    assert torch.equal(fused_moe(x, w13, w2, tw, ids), fused_moe(x, w13, w2, tw, ids, activation="silu"))
    assert not torch.allclose(fused_moe(x, w13, w2, tw, ids), fused_moe(x, w13, w2, tw, ids, activation="swiglu_oai"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(activation="gelu"), "activation must be one of silu, swiglu_oai"),
    (dict(w13_bias=torch.zeros(8, 15)), r"w13_bias must be \[8, 16\]"),
    (dict(w2_bias=torch.zeros(8, 17)), r"w2_bias must be \[8, 16\]"),
    (dict(w2_bias=torch.zeros(8, 16, dtype=torch.float64)), "w2_bias.dtype"),
    (dict(w13_bias=torch.zeros(16, 8).t()), "w13_bias must be contiguous"),
    (dict(w2_bias=[0.0]), "w2_bias must be a torch.Tensor"),
])
def test_bad_activation_or_bias_raises(kwargs, message):
    x, w13, w2, tw, ids = random_problem(3, 8, 2, 16, 8, torch.float32, seed=4)
    with pytest.raises((ValueError, TypeError), match=message):
        fused_moe(x, w13, w2, tw, ids, **kwargs)


@pytest.mark.parametrize("biases", [False, True])
def test_custom_op_with_activation_and_biases_passes_opcheck(biases):
    x, w13, w2, tw, ids, b13, b2 = oai_problem(6, 8, 2, 16, 8, torch.float32, seed=9)
    args = (x, w13, w2, tw, ids, torch.zeros(8, dtype=torch.int64), "swiglu_oai",
            b13 if biases else None, b2 if biases else None)
    results = torch.library.opcheck(torch.ops.staticmoe.fused_moe.default, args)
    assert all(v == "SUCCESS" for v in results.values()), results


def test_compiled_swiglu_oai_equals_eager():
    torch._dynamo.reset()
    x, w13, w2, tw, ids, b13, b2 = oai_problem(11, 8, 2, 16, 8, torch.bfloat16, seed=10)
    run = lambda *a: fused_moe(*a, activation="swiglu_oai", w13_bias=b13, w2_bias=b2)  # noqa: E731
    assert torch.equal(torch.compile(run, backend="aot_eager")(x, w13, w2, tw, ids), run(x, w13, w2, tw, ids))
