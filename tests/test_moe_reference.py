"""The CPU path of `fused_moe` (the pure-torch reference) against a float64 loop over tokens and slots written here,
its T == 0 and expert_load contracts, the custom op under opcheck and torch.compile. Error paths of the checks are
in test_moe_checks.py, the routing helpers in test_moe_routing.py."""

import pytest
import torch

from benchmarks.moe_cases import relative_error
from model.kernels import fused_moe, fused_moe_reference

# Relative error (Frobenius) allowed against the float64 loop. bf16 keeps 8 bits of mantissa (eps 3.9e-3) and
# the path rounds x·w13, the activation and the expert output each once; fp16 has 11 bits (eps 4.9e-4).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def float64_token_slot_sum(x, topk_weights, topk_ids, expert):
    """out[t] = Σ_s w[t,s] · expert(e, x[t]), e = ids[t,s], in float64, one token-slot at a time; `expert(e, xt)`
    maps a float64 row to expert e's float64 output."""
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        xt = x[t].double()
        for s in range(topk_ids.shape[1]):
            out[t] += float(topk_weights[t, s]) * expert(int(topk_ids[t, s]), xt)
    return out


def float64_moe(x, w13, w2, topk_weights, topk_ids):
    """out[t] = Σ_s w[t,s] · W2[e] (silu(Wg[e] x[t]) ⊙ Wu[e] x[t]), e = ids[t,s]."""
    inter = w2.shape[2]

    def expert(e, xt):
        gate = w13[e, :inter].double() @ xt
        up = w13[e, inter:].double() @ xt
        return w2[e].double() @ (gate / (1.0 + torch.exp(-gate)) * up)

    return float64_token_slot_sum(x, topk_weights, topk_ids, expert)


def random_problem(T, E, k, H, I, dtype, seed=0, distinct=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    if distinct:
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    else:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    weights = torch.rand(T, k, generator=g) + 0.05
    weights = weights / weights.sum(1, keepdim=True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "T,E,k,H,I",
    [(1, 4, 1, 8, 8), (7, 8, 2, 32, 24), (33, 16, 6, 40, 16), (20, 64, 8, 16, 32), (5, 3, 3, 24, 8)],
)
def test_fused_moe_cpu_matches_float64_loop(dtype, T, E, k, H, I):
    x, w13, w2, tw, ids = random_problem(T, E, k, H, I, dtype, seed=T * 131 + E)
    out = fused_moe(x, w13, w2, tw, ids)
    assert out.shape == (T, H) and out.dtype == dtype
    err = relative_error(out, float64_moe(x, w13, w2, tw, ids))
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e} for {dtype}"


def test_repeated_expert_in_one_token_counts_twice():
    """The op does not require distinct experts per token: a repeated id contributes once per slot."""
    x, w13, w2, tw, ids = random_problem(9, 4, 3, 16, 8, torch.float32, seed=3, distinct=False)
    ids[:, 1] = ids[:, 0]
    assert relative_error(fused_moe(x, w13, w2, tw, ids), float64_moe(x, w13, w2, tw, ids)) <= 1e-5


def test_unrouted_experts_and_zero_weights():
    """Experts nobody picks contribute nothing; a zero routing weight removes that slot's contribution."""
    x, w13, w2, tw, ids = random_problem(6, 8, 2, 16, 8, torch.float32, seed=4)
    ids[:, 0], ids[:, 1] = 2, 5
    tw[:, 1] = 0.0
    w13_poisoned = w13.clone()
    w13_poisoned[[0, 1, 3, 4, 6, 7]] = 1e30  # huge weights of unused experts must not leak in
    out = fused_moe(x, w13_poisoned, w2, tw, ids)
    only_slot0 = float64_moe(x, w13, w2, tw[:, :1].contiguous(), ids[:, :1].contiguous())
    assert torch.isfinite(out).all()
    assert relative_error(out, only_slot0) <= 1e-5


def test_reference_float64_compute_dtype_is_exact():
    x, w13, w2, tw, ids = random_problem(11, 8, 2, 16, 16, torch.bfloat16, seed=5)
    out = fused_moe_reference(x.double(), w13.double(), w2.double(), tw, ids, compute_dtype=torch.float64)
    assert relative_error(out, float64_moe(x, w13, w2, tw, ids)) <= 1e-12


def test_results_are_deterministic():
    x, w13, w2, tw, ids = random_problem(64, 16, 4, 32, 16, torch.bfloat16, seed=6)
    first = fused_moe(x, w13, w2, tw, ids)
    for _ in range(3):
        assert torch.equal(fused_moe(x, w13, w2, tw, ids), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_tokens_returns_empty(dtype):
    _, w13, w2, _, _ = random_problem(1, 8, 2, 16, 8, dtype)
    load = torch.zeros(8, dtype=torch.int64)
    out = fused_moe(
        torch.empty(0, 16, dtype=dtype), w13, w2, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32), load
    )
    assert out.shape == (0, 16) and out.dtype == dtype
    assert torch.equal(load, torch.zeros(8, dtype=torch.int64))


def test_expert_load_accumulates_token_counts():
    E = 16
    load = torch.zeros(E, dtype=torch.int64)
    expected = torch.zeros(E, dtype=torch.int64)
    for seed, T in enumerate((1, 13, 50)):
        x, w13, w2, tw, ids = random_problem(T, E, 4, 16, 8, torch.float32, seed=seed)
        fused_moe(x, w13, w2, tw, ids, load)
        for e in ids.flatten().tolist():
            expected[e] += 1
        assert torch.equal(load, expected), f"after call {seed}: {load.tolist()} != {expected.tolist()}"
    assert int(load.sum()) == 4 * (1 + 13 + 50)


def test_expert_load_does_not_change_the_output():
    x, w13, w2, tw, ids = random_problem(12, 8, 2, 16, 8, torch.float32, seed=8)
    assert torch.equal(fused_moe(x, w13, w2, tw, ids, torch.zeros(8, dtype=torch.int64)), fused_moe(x, w13, w2, tw, ids))


@pytest.mark.parametrize("with_load", [False, True])
def test_custom_op_passes_opcheck(with_load):
    x, w13, w2, tw, ids = random_problem(6, 8, 2, 16, 8, torch.float32, seed=9)
    load = torch.zeros(8, dtype=torch.int64) if with_load else None
    results = torch.library.opcheck(torch.ops.staticmoe.fused_moe.default, (x, w13, w2, tw, ids, load))
    assert all(v == "SUCCESS" for v in results.values()), results


def test_custom_op_fake_gives_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 16, dtype=torch.bfloat16)
        out = torch.ops.staticmoe.fused_moe(
            x,
            torch.empty(8, 16, 16, dtype=torch.bfloat16),
            torch.empty(8, 16, 8, dtype=torch.bfloat16),
            torch.empty(5, 2),
            torch.empty(5, 2, dtype=torch.int32),
            None,
        )
    assert out.shape == (5, 16) and out.dtype == torch.bfloat16


def test_fused_moe_under_torch_compile_equals_eager():
    torch._dynamo.reset()
    compiled = torch.compile(fused_moe, backend="aot_eager")
    for T in (3, 17):  # a second size exercises recompilation / dynamic shapes
        x, w13, w2, tw, ids = random_problem(T, 8, 2, 16, 8, torch.bfloat16, seed=T)
        load_eager, load_compiled = torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
        want = fused_moe(x, w13, w2, tw, ids, load_eager)
        got = compiled(x, w13, w2, tw, ids, load_compiled)
        assert torch.equal(got, want)
        assert torch.equal(load_compiled, load_eager)


def test_custom_op_compiles_in_one_graph():
    """The op itself (below the Python checks) traces without graph breaks."""
    torch._dynamo.reset()

    def layer(x, w13, w2, tw, ids, load):
        return torch.ops.staticmoe.fused_moe(x * 2, w13, w2, tw, ids, load) + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x, w13, w2, tw, ids = random_problem(7, 8, 2, 16, 8, torch.float32, seed=12)
    load_eager, load_compiled = torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
    assert torch.equal(compiled(x, w13, w2, tw, ids, load_compiled), layer(x, w13, w2, tw, ids, load_eager))
    assert torch.equal(load_compiled, load_eager)


@pytest.mark.parametrize("activation,bias", [("silu", False), ("swiglu_oai", True)])
def test_graph_capture_form_matches_the_float64_loop(monkeypatch, activation, bias):
    """The form taken inside a CUDA graph (no counts read back: every expert on every slot, each slot keeping its own
    expert's output) against the float64 token-slot loop; repeated ids and out-of-range ids (routed nowhere)
    included. Run on the CPU by declaring a capture."""
    from model.kernels import reference

    x, w13, w2, tw, ids = random_problem(9, 6, 3, 16, 8, torch.float32, seed=5, distinct=False)
    ids[0, 1], ids[4, 2] = -1, 6  # outside [0, E): contribute nothing
    kwargs = dict(activation=activation)
    if bias:
        g = torch.Generator().manual_seed(1)
        kwargs.update(w13_bias=torch.randn(6, 16, generator=g), w2_bias=torch.randn(6, 16, generator=g))
    want = fused_moe_reference(x, w13, w2, tw, ids, compute_dtype=torch.float64, **kwargs)
    looped = fused_moe_reference(x, w13, w2, tw, ids, **kwargs)
    monkeypatch.setattr(reference, "graph_capturing", lambda _: True)
    captured = fused_moe_reference(x, w13, w2, tw, ids, **kwargs)
    assert relative_error(captured, want) <= 1e-6
    torch.testing.assert_close(captured, looped, rtol=1e-5, atol=1e-6)
    in_range = float64_moe(x, w13, w2, tw, ids.masked_fill((ids < 0) | (ids >= 6), 0)) if not bias else None
    if in_range is not None:  # the out-of-range slots really were dropped (not clamped onto expert 0)
        assert relative_error(captured, in_range) > 1e-3
