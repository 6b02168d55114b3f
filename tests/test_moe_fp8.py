"""The FP8 path on the CPU: the quantisers against an e4m3 rounding written here (float64 arithmetic, no fp8 cast),
the reference layer against a float64 loop over tokens and slots, the op through `fused_moe`, every FP8 check, and
the `staticmoe::fused_moe_fp8` custom op under opcheck and torch.compile."""

import pytest
import torch

from model.kernels import (
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    fused_moe,
    fused_moe_fp8_reference,
    fused_moe_reference,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)

FP8 = torch.float8_e4m3fn


# ---- an independent e4m3 quantiser: the contract's rule, rounding done in float64 ----------------------------------

def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round float64 v to the nearest e4m3fn value, ties to even, saturating at ±448. e4m3fn has 3 mantissa bits:
    in the binade [2^e, 2^(e+1)), e ≥ -6, values are 2^(e-3) apart; below 2^-6 (subnormals) 2^-9 apart."""
    v = v.clamp(-448.0, 448.0)
    _, exponent = torch.frexp(v)  # |v| = m · 2^exponent, m in [0.5, 1): binade 2^(exponent-1)
    step = torch.exp2(((exponent - 1).clamp(min=-6) - 3).double())
    return torch.round(v / step) * step  # torch.round rounds half to even


def own_group_quant(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., K] -> (q as float64 [..., K], scale float32 [..., K/128]); amax floored at 1e-10, scale = amax/448."""
    g = v.float().reshape(*v.shape[:-1], -1, 128)
    scale = g.abs().amax(dim=-1).clamp_min(1e-10) / 448.0  # float32 division, as the contract says
    q = e4m3_round((g / scale[..., None]).double())
    return q.reshape(v.shape), scale


def own_group_qdq(v: torch.Tensor) -> torch.Tensor:
    q, scale = own_group_quant(v)
    return (q.reshape(*v.shape[:-1], -1, 128) * scale.double()[..., None]).reshape(v.shape)


def block_index_scale(scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """scale [..., nb, kb] -> [..., N, K] with element (n, k) = scale[..., n // 128, k // 128]."""
    rows, cols = torch.arange(N) // 128, torch.arange(K) // 128
    return scale[..., rows, :][..., :, cols]


# ---- the float64 loop ------------------------------------------------------------------------------------------------

def float64_fp8_moe(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids):
    """out[t] = Σ_s w[t,s] · W2[e] q(silu(Wg[e] q(x[t])) ⊙ Wu[e] q(x[t])), one token-slot at a time, in float64,
    with q = quantise-dequantise per 128 columns (h rounded to float32 before its quantisation, as the contract says);
    ids outside [0, E) skipped."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    deq13 = {e: w13[e].double() * block_index_scale(w13_scale[e].double(), two_i, H) for e in range(E)}
    deq2 = {e: w2[e].double() * block_index_scale(w2_scale[e].double(), H, inter) for e in range(E)}
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        xt = own_group_qdq(x[t])
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            if not 0 <= e < E:
                continue
            gate = deq13[e][:inter] @ xt
            up = deq13[e][inter:] @ xt
            h = gate / (1.0 + torch.exp(-gate)) * up
            out[t] += float(topk_weights[t, s]) * (deq2[e] @ own_group_qdq(h.float()))
    return out


def fp8_problem(T, E, k, H, I, seed=0, x_dtype=torch.bfloat16):
    """Random data with magnitudes that vary across 128-column groups and 128×128 weight blocks (so a scale read
    from the wrong group or block shows), quantised with the library's block quantiser."""
    g = torch.Generator().manual_seed(seed)

    def spread(*shape):  # per-group factors in [0.1, 10]
        return 10.0 ** (2 * torch.rand(*shape, generator=g) - 1)

    x = torch.randn(T, H, generator=g) * spread(1, H // 128).repeat_interleave(128, 1)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w13 = w13 * spread(E, 2 * I // 128, H // 128).repeat_interleave(128, 1).repeat_interleave(128, 2)
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    w2 = w2 * spread(E, H // 128, I // 128).repeat_interleave(128, 1).repeat_interleave(128, 2)
    w13_q, w13_s = quantize_fp8_blocks(w13)
    w2_q, w2_s = quantize_fp8_blocks(w2)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    weights = torch.rand(T, k, generator=g) + 0.05
    weights = weights / weights.sum(1, keepdim=True)
    return x.to(x_dtype), w13_q, w13_s, w2_q, w2_s, weights, ids


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


SHAPES = [  # T, E, k, H, I
    (1, 1, 1, 128, 128),
    (5, 4, 2, 256, 128),
    (33, 16, 4, 128, 384),
    (33, 8, 3, 384, 256),
    (5, 16, 4, 384, 384),
]


# ---- quantisers ------------------------------------------------------------------------------------------------------

def spread_groups(R, K, seed, lo=-4.0, hi=4.0):
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** (lo + (hi - lo) * torch.rand(R, K // 128, 1, generator=g))
    return (torch.randn(R, K // 128, 128, generator=g) * mag).reshape(R, K)


def test_group_quantiser_is_round_to_nearest_even_of_x_over_scale():
    x = spread_groups(64, 512, seed=1)
    q, scale = quantize_fp8_groups(x)
    assert q.dtype == FP8 and q.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (64, 4)
    want_q, want_scale = own_group_quant(x)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.double(), want_q)


def test_ties_round_to_even():
    """amax 448 gives scale exactly 1, so these are the values the cast sees: each is halfway between two e4m3
    neighbours and must go to the one with the even mantissa."""
    ties = [1.0625, 1.1875, 17.0, 19.0, 2.0**-10, 3 * 2.0**-10, -1.0625, 416.0]
    expect = [1.0, 1.25, 16.0, 20.0, 0.0, 2.0**-8, -1.0, 416.0]  # 416 is representable (13·32)
    x = torch.zeros(1, 128)
    x[0, 0] = 448.0
    x[0, 1 : 1 + len(ties)] = torch.tensor(ties)
    q, scale = quantize_fp8_groups(x)
    assert scale.item() == 1.0
    assert q[0, 1 : 1 + len(ties)].float().tolist() == expect


def test_group_round_trip_error_bound():
    """Derived bound. v = x/scale has |v| ≤ 448. e4m3 keeps 3 mantissa bits: in a binade [2^e, 2^(e+1)) (e ≥ -6)
    neighbours are 2^(e-3) apart, so rounding to nearest moves v by ≤ 2^(e-4) ≤ |v|·2^-4; below 2^-6 (subnormals)
    they are 2^-9 apart, so ≤ 2^-10. Hence |x − q·scale| ≤ max(|x|·2^-4, scale·2^-10), up to the float32 rounding
    of x/scale (relative 2^-24; the float64 dequantisation is exact). The bound is nearly attained (ratio → 1/(1+2^-4)
    just above a power of two), which a quantiser keeping more bits would not do."""
    x = spread_groups(128, 1024, seed=2)
    q, scale = quantize_fp8_groups(x)
    err = (x.double() - dequantize_fp8_groups(q, scale, torch.float64)).abs()
    s = scale.double().repeat_interleave(128, dim=1)
    bound = torch.maximum(x.double().abs() / 16, s / 1024)
    ratio = err / bound
    assert ratio.max() <= 1 + 2.0**-19, f"round-trip error {ratio.max():.6f}× the bound"
    assert ratio.max() > 0.9
    subnormal = x.double().abs() / s < 2.0**-6
    assert subnormal.any() and (err[subnormal] <= s[subnormal] / 1024 * (1 + 2.0**-19)).all()


def test_scale_is_amax_over_448_and_amax_maps_to_448():
    x = spread_groups(16, 384, seed=3).bfloat16()
    q, scale = quantize_fp8_groups(x)
    groups = x.float().reshape(16, 3, 128)
    assert torch.equal(scale, groups.abs().amax(-1) / 448.0)
    assert torch.equal(q.float().reshape(16, 3, 128).abs().amax(-1), torch.full((16, 3), 448.0))


def test_zero_group_gives_zeros_and_a_finite_scale():
    x = spread_groups(4, 384, seed=4)
    x[1, 128:256] = 0.0
    q, scale = quantize_fp8_groups(x)
    assert torch.isfinite(scale).all() and torch.isfinite(q.float()).all()
    assert scale[1, 1] == torch.tensor(1e-10) / 448.0  # the amax floor, float32
    assert (q[1, 128:256].float() == 0).all()
    assert (dequantize_fp8_groups(q, scale)[1, 128:256] == 0).all()
    assert torch.equal(q[[0, 2, 3]].float(), quantize_fp8_groups(x[[0, 2, 3]])[0].float())  # other rows unaffected
    wq, ws = quantize_fp8_blocks(torch.zeros(2, 130, 256))
    assert torch.isfinite(ws).all() and (wq.float() == 0).all()


@pytest.mark.parametrize("huge", [1e30, 3.0e38])
def test_huge_group_saturates_at_448_scale(huge):
    x = spread_groups(2, 256, seed=5)
    x[0, :128] *= huge / x[0, :128].abs().max()  # amax exactly `huge` (float32-rounded)
    x[0, 7] = -x[0, :128].abs().max()  # a negative extreme too
    q, scale = quantize_fp8_groups(x)
    deq = dequantize_fp8_groups(q, scale, torch.float64)
    assert torch.isfinite(scale).all() and torch.isfinite(deq).all()
    assert q[0, 7].float().item() == -448.0 and q[0, :128].float().abs().max().item() == 448.0
    assert deq[0, 7].item() == -448.0 * scale[0, 0].double().item()
    assert abs(deq[0, 7].item() - x[0, 7].item()) <= abs(x[0, 7].item()) * 2.0**-20


@pytest.mark.parametrize("shape", [(130, 129), (3, 200, 300), (2, 2, 128, 256), (1, 5)])
def test_block_quantiser_with_ragged_blocks(shape):
    """Each 128×128 block (the last ones ragged) gets scale = its amax / 448; q is the rounding of w / scale;
    the float64 dequantisation is q × the block's scale, element by element."""
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(*shape, generator=g) * 10.0 ** (4 * torch.rand(*shape, generator=g) - 2)
    q, scale = quantize_fp8_blocks(w)
    *lead, N, K = shape
    nb, kb = (N + 127) // 128, (K + 127) // 128
    assert q.dtype == FP8 and q.shape == w.shape and q.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == (*lead, nb, kb)
    w3, q3, s3 = w.reshape(-1, N, K), q.reshape(-1, N, K), scale.reshape(-1, nb, kb)
    for b in range(w3.shape[0]):
        for i in range(nb):
            for j in range(kb):
                block = w3[b, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                want_scale = block.abs().max().clamp_min(1e-10) / 448.0
                assert s3[b, i, j] == want_scale, (b, i, j)
                want_q = e4m3_round((block / want_scale).double())
                assert torch.equal(q3[b, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double(), want_q)
    s_full = block_index_scale(scale.double(), N, K)
    deq = dequantize_fp8_blocks(q, scale, torch.float64)
    assert deq.dtype == torch.float64 and torch.equal(deq, q.double() * s_full)
    bound = torch.maximum(w.double().abs() / 16, s_full / 1024) * (1 + 2.0**-19)
    assert ((w.double() - deq).abs() <= bound).all()
    assert dequantize_fp8_blocks(q, scale).dtype == torch.float32


def test_quantiser_shape_errors():
    with pytest.raises(ValueError, match="multiple of 128"):
        quantize_fp8_groups(torch.randn(2, 200))
    q, scale = quantize_fp8_blocks(torch.randn(256, 256))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_fp8_blocks(q, scale[:1])


# ---- the reference layer against the float64 loop -------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_reference_float64_matches_float64_loop(T, E, k, H, I):
    """compute_dtype=float64 on float32 input: the same quantisation decisions as the loop, so the only difference
    is the float32 output rounding (≤ 2^-24 relative per element)."""
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T * 7 + E, x_dtype=torch.float32)
    out = fused_moe_fp8_reference(x, w13, w13_s, w2, w2_s, tw, ids, compute_dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == (T, H)
    err = relative_error(out, float64_fp8_moe(x, w13, w13_s, w2, w2_s, tw, ids))
    assert err <= 1e-7, f"relative error {err:.2e}"


@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_reference_float32_matches_float64_loop(T, E, k, H, I):
    """The default compute_dtype=float32 on float32 input: float32 GEMM rounding, plus the odd fp8 rounding decision
    of h that float32 summation flips (one step of ≤ 2^-4 relative on one element). Measured 1e-7 to 8e-6 over
    these shapes and three seeds; a wrong scale, group or rounding mode gives ≥ 1e-2."""
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T * 7 + E, x_dtype=torch.float32)
    out = fused_moe_fp8_reference(x, w13, w13_s, w2, w2_s, tw, ids)
    err = relative_error(out, float64_fp8_moe(x, w13, w13_s, w2, w2_s, tw, ids))
    assert err <= 1e-4, f"relative error {err:.2e}"


@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_fused_moe_fp8_cpu_matches_float64_loop(T, E, k, H, I):
    """The op as served: bf16 x, float32 compute, bf16 output. Against the float64 loop the bf16 output rounding
    (≤ 2^-9 relative per element) dominates: measured 1.5e-3 to 1.9e-3."""
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T * 5 + E)
    out = fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    err = relative_error(out, float64_fp8_moe(x, w13, w13_s, w2, w2_s, tw, ids))
    assert err <= 3e-3, f"relative error {err:.2e}"


def test_out_of_range_ids_are_skipped_only_when_asked():
    T, E, k, H, I = 33, 8, 4, 256, 128
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=11)
    foreign = torch.rand(T, k, generator=torch.Generator().manual_seed(12)) < 0.3
    foreign[0] = True  # a token with no expert at all gives zeros
    ids_f = ids.masked_fill(foreign, -1)
    ids_f[1][foreign[1]] = E + 3
    scales = dict(w13_scale=w13_s, w2_scale=w2_s)
    with pytest.raises(ValueError, match="expert ids must be in"):
        fused_moe(x, w13, w2, tw, ids_f, **scales)
    load = torch.zeros(E, dtype=torch.int64)
    out = fused_moe(x, w13, w2, tw, ids_f, load, skip_out_of_range_ids=True, **scales)
    assert (out[0] == 0).all()
    assert relative_error(out, float64_fp8_moe(x, w13, w13_s, w2, w2_s, tw, ids_f)) <= 3e-3
    expected = fused_moe(x, w13, w2, tw.masked_fill(foreign, 0.0), ids.masked_fill(foreign, 0), **scales)
    assert torch.equal(out, expected)
    kept = [e for e, f in zip(ids.flatten().tolist(), foreign.flatten().tolist()) if not f]
    assert load.tolist() == [kept.count(e) for e in range(E)]


# ---- the op ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,E,k,H,I", SHAPES)
def test_fused_moe_fp8_equals_reference_and_is_near_the_float32_layer(T, E, k, H, I):
    """fused_moe on the CPU is the reference, bit for bit. Against a float32 layer on the dequantised weights with
    unquantised activations, the error is that of quantising x and h to e4m3 (≤ 2^-4 relative per element, more
    for the elements of a group far below its amax): measured 3.6e-2 to 5.3e-2 at T ≥ 5 and 3.1e-2 to 6.2e-2 at
    T = 1 (one row of 128) over these shapes and three seeds. The GPU tests hold the kernel to ≤ 2× the reference's
    own error; here the reference must be in that band (quantised, not worse)."""
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, E, k, H, I, seed=T * 3 + E)
    load = torch.zeros(E, dtype=torch.int64)
    out = fused_moe(x, w13, w2, tw, ids, load, w13_scale=w13_s, w2_scale=w2_s)
    assert torch.equal(out, fused_moe_fp8_reference(x, w13, w13_s, w2, w2_s, tw, ids))
    assert load.tolist() == [int((ids == e).sum()) for e in range(E)]
    layer32 = fused_moe_reference(
        x.float(), dequantize_fp8_blocks(w13, w13_s), dequantize_fp8_blocks(w2, w2_s), tw, ids,
        compute_dtype=torch.float32,
    )
    err = relative_error(out, layer32)
    assert 1e-2 <= err <= 8e-2, f"relative error to the float32 layer {err:.2e}"


def test_fp8_zero_tokens_returns_empty_and_counts_nothing():
    _, w13, w13_s, w2, w2_s, _, _ = fp8_problem(1, 4, 2, 128, 128)
    load = torch.zeros(4, dtype=torch.int64)
    out = fused_moe(
        torch.empty(0, 128, dtype=torch.bfloat16), w13, w2, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32),
        load, w13_scale=w13_s, w2_scale=w2_s,
    )
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16
    assert not load.any()


def test_fp8_results_are_deterministic():
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(33, 16, 4, 128, 128, seed=6)
    first = fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s)
    assert torch.equal(fused_moe(x, w13, w2, tw, ids, w13_scale=w13_s, w2_scale=w2_s), first)


# ---- checks ----------------------------------------------------------------------------------------------------------

CT, CE, CK, CH, CI = 3, 4, 2, 128, 256


def good():
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(CT, CE, CK, CH, CI, seed=20)
    return dict(x=x, w13=w13, w2=w2, topk_weights=tw, topk_ids=ids, w13_scale=w13_s, w2_scale=w2_s)


def with_(**changes):
    args = good()
    args.update(changes)
    return args


def fp8_zeros(*shape):
    return torch.zeros(*shape).to(FP8)


def ones_scale(*shape):
    return torch.ones(*shape)


BAD_INPUTS = {
    # name: (kwargs, exception, message regex)
    "w13_scale missing": (with_(w13_scale=None), ValueError, "w13_scale is required"),
    "w2_scale missing": (with_(w2_scale=None), ValueError, "w2_scale is required"),
    "w13_scale not a tensor": (with_(w13_scale=1.0), TypeError, "w13_scale must be a torch.Tensor"),
    "w13_scale bf16": (with_(w13_scale=ones_scale(CE, 4, 1).bfloat16()), TypeError, "w13_scale must be float32"),
    "w2_scale float64": (with_(w2_scale=ones_scale(CE, 1, 2).double()), TypeError, "w2_scale must be float32"),
    "w13_scale wrong blocks": (with_(w13_scale=ones_scale(CE, 4, 2)), ValueError, r"w13_scale must be float32 \[4, 4, 1\]"),
    "w13_scale transposed": (with_(w13_scale=ones_scale(CE, 1, 4)), ValueError, "w13_scale must be"),
    "w2_scale wrong E": (with_(w2_scale=ones_scale(CE + 1, 1, 2)), ValueError, r"w2_scale must be float32 \[4, 1, 2\]"),
    "w2_scale 2-D": (with_(w2_scale=ones_scale(1, 2)), ValueError, "w2_scale must be"),
    "w13_scale not contiguous": (
        with_(w13_scale=ones_scale(CE, 4, 2)[..., :1]), ValueError, "w13_scale must be contiguous",
    ),
    "w2_scale not contiguous": (
        with_(w2_scale=ones_scale(2 * CE, 1, 2)[::2]), ValueError, "w2_scale must be contiguous",
    ),
    "w2_scale on another device": (
        with_(w2_scale=torch.empty(CE, 1, 2, device="meta")), ValueError, "one device",
    ),
    "scales with bf16 weights": (
        with_(w13=torch.randn(CE, 2 * CI, CH).bfloat16(), w2=torch.randn(CE, CH, CI).bfloat16()),
        ValueError,
        "w13_scale is only for float8_e4m3fn weights",
    ),
    "w2_scale alone with bf16 weights": (
        with_(w13=torch.randn(CE, 2 * CI, CH).bfloat16(), w2=torch.randn(CE, CH, CI).bfloat16(), w13_scale=None),
        ValueError,
        "w2_scale is only for float8_e4m3fn weights",
    ),
    "x fp16 with fp8 weights": (with_(x=torch.randn(CT, CH).half()), TypeError, "x must be bfloat16"),
    "w2 bf16 with fp8 w13": (with_(w2=torch.randn(CE, CH, CI).bfloat16()), TypeError, "w2 must be float8_e4m3fn"),
    "w13 bf16 with fp8 w2": (with_(w13=torch.randn(CE, 2 * CI, CH).bfloat16()), ValueError, "w13_scale is only"),
    "H not multiple of 128": (
        with_(x=torch.randn(CT, 136).bfloat16(), w13=fp8_zeros(CE, 2 * CI, 136), w2=fp8_zeros(CE, 136, CI),
              w13_scale=ones_scale(CE, 4, 2), w2_scale=ones_scale(CE, 2, 2)),
        ValueError,
        "H=136 and intermediate size I=256 to be multiples of 128",
    ),
    "I not multiple of 128": (
        with_(w13=fp8_zeros(CE, 2 * 200, CH), w2=fp8_zeros(CE, CH, 200),
              w13_scale=ones_scale(CE, 4, 1), w2_scale=ones_scale(CE, 1, 2)),
        ValueError,
        "I=200 to be multiples of 128",
    ),
    "w2 wrong shape": (with_(w2=fp8_zeros(CE, CH, CI + 128)), ValueError, "w2 must be"),
    "w13 not contiguous": (
        with_(w13=fp8_zeros(CE, CH, 2 * CI).transpose(1, 2)), ValueError, "w13 must be contiguous",
    ),
    "id out of range": (with_(topk_ids=torch.full((CT, CK), CE, dtype=torch.int32)), ValueError, "expert ids"),
    "E > 1024": (
        with_(w13=fp8_zeros(1025, 2 * CI, CH), w2=fp8_zeros(1025, CH, CI), w13_scale=ones_scale(1025, 4, 1),
              w2_scale=ones_scale(1025, 1, 2)),
        ValueError,
        "number of experts 1025",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_fp8_input_raises_a_clear_error(case):
    kwargs, exc, message = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        fused_moe(**kwargs)


def test_the_valid_fp8_problem_passes_and_float32_x_is_accepted():
    assert fused_moe(**good()).shape == (CT, CH)
    args = good()
    args["x"] = args["x"].float()
    out = fused_moe(**args)
    assert out.dtype == torch.float32
    assert torch.equal(out.bfloat16(), fused_moe(**good()))  # bf16-valued x: the same layer, rounded once


def test_bad_fp8_input_does_not_touch_expert_load():
    load = torch.zeros(CE, dtype=torch.int64)
    with pytest.raises(ValueError):
        fused_moe(**with_(w13_scale=ones_scale(CE, 4, 2)), expert_load=load)
    assert not load.any()


# ---- the custom op ---------------------------------------------------------------------------------------------------

def op_args(with_load, T=6, seed=9):
    x, w13, w13_s, w2, w2_s, tw, ids = fp8_problem(T, 8, 2, 128, 128, seed=seed)
    load = torch.zeros(8, dtype=torch.int64) if with_load else None
    return (x, w13, w13_s, w2, w2_s, tw, ids, load)


@pytest.mark.parametrize("with_load", [False, True])
def test_fp8_custom_op_passes_opcheck(with_load):
    """All of opcheck but test_schema, whose mutation check multiplies the inputs and has no CPU kernel for
    float8_e4m3fn (torch 2.13: "mul_cpu_reduced_float" not implemented); the next test checks what it would."""
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    results = torch.library.opcheck(torch.ops.staticmoe.fused_moe_fp8.default, op_args(with_load), test_utils=utils)
    assert results == {u: "SUCCESS" for u in utils}, results


def test_fp8_custom_op_mutates_only_expert_load_and_returns_a_fresh_tensor():
    args = op_args(with_load=True)
    before = [a.clone() for a in args]
    out = torch.ops.staticmoe.fused_moe_fp8(*args)
    for a, b in zip(args[:-1], before[:-1]):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a, b.view(torch.uint8) if b.dtype == FP8 else b)
    assert int(args[-1].sum()) == args[6].numel() and not torch.equal(args[-1], before[-1])
    assert all(out.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() for a in args)
    schema = torch.ops.staticmoe.fused_moe_fp8.default._schema
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == ["expert_load"]


def test_fp8_custom_op_fake_gives_output_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.staticmoe.fused_moe_fp8(
            torch.empty(5, 256, dtype=torch.bfloat16),
            torch.empty(8, 256, 256, dtype=FP8),
            torch.empty(8, 2, 2),
            torch.empty(8, 256, 128, dtype=FP8),
            torch.empty(8, 2, 1),
            torch.empty(5, 2),
            torch.empty(5, 2, dtype=torch.int32),
            None,
        )
    assert out.shape == (5, 256) and out.dtype == torch.bfloat16


def test_fp8_custom_op_compiles_in_one_graph():
    torch._dynamo.reset()

    def layer(x, w13, w13_s, w2, w2_s, tw, ids, load):
        return torch.ops.staticmoe.fused_moe_fp8(x * 2, w13, w13_s, w2, w2_s, tw, ids, load) + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    args = op_args(with_load=True, T=7, seed=12)
    load_eager = torch.zeros(8, dtype=torch.int64)
    want = layer(*args[:-1], load_eager)
    assert torch.equal(compiled(*args), want)
    assert torch.equal(args[-1], load_eager)


def test_fused_moe_fp8_under_torch_compile_equals_eager():
    torch._dynamo.reset()
    compiled = torch.compile(fused_moe, backend="aot_eager")
    for T in (3, 17):
        x, w13, w13_s, w2, w2_s, tw, ids, _ = op_args(with_load=False, T=T, seed=T)
        load_eager, load_compiled = torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
        want = fused_moe(x, w13, w2, tw, ids, load_eager, w13_scale=w13_s, w2_scale=w2_s)
        got = compiled(x, w13, w2, tw, ids, load_compiled, w13_scale=w13_s, w2_scale=w2_s)
        assert torch.equal(got, want)
        assert torch.equal(load_compiled, load_eager)
