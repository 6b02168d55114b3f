"""GPU correctness of the gpt-oss epilogues (pytest -m gpu): GEMM1 + w13 bias + clamped SwiGLU and GEMM2 + w2 bias
x routing weight, against the float32 reference, at gpt-oss-20b (E32 k4 H2880 I2880) and -120b (E128) shapes over
the usual routings, every tile kind (decode, large, 2-CTA cluster) and bf16/fp16; plus biases alone and the clamp
alone, so a fault is attributed to one part; and the FP8 kernels' epilogues at those shapes padded to 2944."""

import pytest
import torch

from benchmarks.moe_cases import GPT_OSS_EXPERT_SHAPES, make_routing, relative_error, swiglu_oai_case
from model.kernels import extension, fused_moe_reference
from model.kernels.activation import ACTIVATION_CODES, Activation
from tests.test_kernels_fp8_gpu import float32_layer

pytestmark = pytest.mark.gpu

TOKENS = (1, 7, 64, 513, 4096)  # decode tiles up to 64 expected rows per expert, then large, then clusters (E32)
ROUTINGS = ("uniform", "zipf", "same", "sparse90")


@pytest.fixture(scope="module")
def case_cache():
    cache = {}

    def get(name, dtype=torch.bfloat16):
        if (name, dtype) not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            E, _, H, I = GPT_OSS_EXPERT_SHAPES[name]
            cache[(name, dtype)] = swiglu_oai_case(E, H, I, torch.Generator(device="cuda").manual_seed(7), dtype)
        return cache[(name, dtype)]

    return get


def run_poisoned(x, case, tw, ids, activation=Activation.SWIGLU_OAI, biases=True):
    T, H = x.shape
    w13, w2 = case["w13"], case["w2"]
    out = torch.full_like(x, float("nan"))
    ws = extension.moe_workspace(T, ids.shape[1], w13.shape[0], H, w2.shape[2], x.device).fill_(0xFF)
    res = extension.fused_moe_cuda(x, w13, w2, tw, ids, None, out=out, workspace=ws,
                                   activation=ACTIVATION_CODES[activation],
                                   w13_bias=case["w13_bias"] if biases else None,
                                   w2_bias=case["w2_bias"] if biases else None)
    torch.cuda.synchronize()
    return res


def check_against_fp32(x, case, tw, ids, activation=Activation.SWIGLU_OAI, biases=True):
    out = run_poisoned(x, case, tw, ids, activation, biases)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    kw = dict(activation=activation, w13_bias=case["w13_bias"] if biases else None,
              w2_bias=case["w2_bias"] if biases else None)
    ref32 = fused_moe_reference(x, case["w13"], case["w2"], tw, ids, compute_dtype=torch.float32, **kw)
    ref_lowp = fused_moe_reference(x, case["w13"], case["w2"], tw, ids, **kw)  # same-precision pure torch
    err, err_lowp = relative_error(out, ref32), relative_error(ref_lowp, ref32)
    assert err <= 2 * err_lowp + 1e-4, f"relative error {err:.2e} vs pure-torch {x.dtype} {err_lowp:.2e}"
    return err


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", list(GPT_OSS_EXPERT_SHAPES))
def test_swiglu_oai_with_biases_matches_fp32_reference(shape, T, routing, case_cache):
    E, k, H, _ = GPT_OSS_EXPERT_SHAPES[shape]
    case = case_cache(shape)
    tw, ids = make_routing(routing, T, E, k, torch.Generator().manual_seed(T * 31 + E))
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    check_against_fp32(x, case, tw.cuda(), ids.cuda())


def test_the_clamp_is_exercised_at_the_real_shape(case_cache):
    case = case_cache("gpt-oss-20b")
    x = torch.randn(64, 2880, device="cuda", dtype=torch.bfloat16)
    gate_up = x.float() @ case["w13"][0].float().t() + case["w13_bias"][0].float()  # [64, 2I]
    beyond = (gate_up[:, :2880] > 7).float().mean(), (gate_up[:, 2880:].abs() > 7).float().mean()
    assert min(beyond) > 0.005, beyond


@pytest.mark.parametrize("activation,biases", [(Activation.SILU, True), (Activation.SWIGLU_OAI, False)])
@pytest.mark.parametrize("T", [5, 700, 6000])
def test_bias_and_activation_separately(activation, biases, T, case_cache):
    case = case_cache("gpt-oss-20b")
    tw, ids = make_routing("uniform", T, 32, 4, torch.Generator().manual_seed(T))
    x = torch.randn(T, 2880, device="cuda", dtype=torch.bfloat16)
    check_against_fp32(x, case, tw.cuda(), ids.cuda(), activation, biases)


@pytest.mark.parametrize("T", [3, 300, 5000])
def test_float16(T, case_cache):
    case = case_cache("gpt-oss-20b", torch.float16)
    tw, ids = make_routing("zipf", T, 32, 4, torch.Generator().manual_seed(T))
    x = torch.randn(T, 2880, device="cuda", dtype=torch.float16)
    check_against_fp32(x, case, tw.cuda(), ids.cuda())


def test_silu_without_biases_is_unchanged_by_the_new_arguments(case_cache):
    """Passing activation=silu and no biases gives bitwise the output of the plain launch."""
    case = case_cache("gpt-oss-20b")
    tw, ids = make_routing("zipf", 257, 32, 4, torch.Generator().manual_seed(3))
    x = torch.randn(257, 2880, device="cuda", dtype=torch.bfloat16)
    plain = extension.fused_moe_cuda(x, case["w13"], case["w2"], tw.cuda(), ids.cuda(), None)
    again = run_poisoned(x, case, tw.cuda(), ids.cuda(), Activation.SILU, biases=False)
    assert torch.equal(plain, again)


def test_fused_moe_op_and_cuda_graph_replay_with_new_routing(case_cache):
    """Through the public op (checks + custom op) inside a captured graph, replayed with new routing."""
    from model.kernels import fused_moe

    case = case_cache("gpt-oss-20b")
    T = 16
    x = torch.randn(T, 2880, device="cuda", dtype=torch.bfloat16)
    tw, ids = (t.cuda() for t in make_routing("uniform", T, 32, 4, torch.Generator().manual_seed(1)))
    run = lambda: fused_moe(x, case["w13"], case["w2"], tw, ids, activation="swiglu_oai",  # noqa: E731
                            w13_bias=case["w13_bias"], w2_bias=case["w2_bias"])
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in (2, 3):
        new_tw, new_ids = make_routing("zipf", T, 32, 4, torch.Generator().manual_seed(seed))
        tw.copy_(new_tw), ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        ref = fused_moe_reference(x, case["w13"], case["w2"], tw, ids, compute_dtype=torch.float32,
                                  activation="swiglu_oai", w13_bias=case["w13_bias"], w2_bias=case["w2_bias"])
        assert relative_error(out, ref) < 2e-2


# ---- FP8 weights: the same epilogues in the e4m3 kernels (H and I whole 128-blocks: gpt-oss's 2880 padded) -----------
FP8_SHAPES = {"gpt-oss-20b-padded": (32, 4, 2944, 2944), "gpt-oss-120b-padded": (128, 4, 2944, 2944)}


@pytest.mark.parametrize("routing", ["uniform", "zipf", "same"])
@pytest.mark.parametrize("T", [1, 64, 513, 4096])
@pytest.mark.parametrize("shape", list(FP8_SHAPES))
def test_fp8_swiglu_oai_with_biases_matches_fp32_reference(shape, T, routing):
    from model.kernels.fp8 import fused_moe_fp8_reference, quantize_fp8_blocks

    E, k, H, I = FP8_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(E + T)
    case = swiglu_oai_case(E, H, I, gen, torch.bfloat16)
    w13, s13 = quantize_fp8_blocks(case["w13"])
    w2, s2 = quantize_fp8_blocks(case["w2"])
    del case["w13"], case["w2"]
    tw, ids = (t.cuda() for t in make_routing(routing, T, E, k, torch.Generator().manual_seed(T)))
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    ws = extension.moe_workspace(T, k, E, H, I, x.device, fp8=True).fill_(0xFF)
    extension.fused_moe_fp8_cuda(x, w13, s13, w2, s2, tw, ids, None, out=out, workspace=ws,
                                 activation=ACTIVATION_CODES[Activation.SWIGLU_OAI], w13_bias=case["w13_bias"],
                                 w2_bias=case["w2_bias"])
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref32 = float32_layer(x, w13, s13, w2, s2, tw, ids, Activation.SWIGLU_OAI, case["w13_bias"], case["w2_bias"])
    same_quant = fused_moe_fp8_reference(x, w13, s13, w2, s2, tw, ids, activation="swiglu_oai",
                                         w13_bias=case["w13_bias"], w2_bias=case["w2_bias"])
    err, err_ref = relative_error(out, ref32), relative_error(same_quant, ref32)
    assert err <= 2 * err_ref + 1e-4, f"relative error {err:.3e} vs same-quantisation pure torch {err_ref:.3e}"
    assert relative_error(out, same_quant) < 2e-2, "far from the reference with the same numerics"


@pytest.mark.parametrize("T", [1, 300, 4096])
def test_padded_fp8_experts_at_the_real_shape(T):
    """The real gpt-oss-20b layer (H = I = 2880) quantised by `--quantization fp8`'s transform: padded to 2944, run
    by the FP8 kernels, cut back to 2880; against the same-quantisation pure-torch layer on the padded weights."""
    import torch.nn.functional as F

    from model.kernels.fp8 import fused_moe_fp8_reference
    from model.layers.moe import Experts
    from model.quantization import apply_fp8

    E, k, H, I = GPT_OSS_EXPERT_SHAPES["gpt-oss-20b"]
    case = swiglu_oai_case(E, H, I, torch.Generator(device="cuda").manual_seed(11), torch.bfloat16)
    with torch.device("cuda"):
        holder = torch.nn.Module()
        holder.experts = Experts(E, H, I, "swiglu_oai", bias=True).to(torch.bfloat16)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(holder.experts, name).copy_(case[name.replace("gate_up_proj", "w13").replace("down_proj", "w2")])
        holder.experts.gate_up_proj_bias.copy_(case["w13_bias"])
        holder.experts.down_proj_bias.copy_(case["w2_bias"])
    experts = apply_fp8(holder, ["experts"]).experts
    assert experts.is_padded and experts.gate_up_proj.shape[1:] == (2 * 2944, 2944)
    tw, ids = (t.cuda() for t in make_routing("zipf", T, E, k, torch.Generator().manual_seed(T)))
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    out = experts(x, tw, ids)
    torch.cuda.synchronize()
    b13 = torch.cat([F.pad(case["w13_bias"][:, :I], (0, 64)), F.pad(case["w13_bias"][:, I:], (0, 64))], dim=1)
    same_quant = fused_moe_fp8_reference(F.pad(x, (0, 64)), experts.gate_up_proj, experts.gate_up_proj_scale_inv,
                                         experts.down_proj, experts.down_proj_scale_inv, tw, ids,
                                         activation="swiglu_oai", w13_bias=b13,
                                         w2_bias=F.pad(case["w2_bias"], (0, 64)))[:, :H]
    assert out.shape == (T, H) and not out.isnan().any()
    assert relative_error(out, same_quant) < 2e-2
    bf16 = fused_moe_reference(x, case["w13"], case["w2"], tw, ids, compute_dtype=torch.float32,
                               activation="swiglu_oai", w13_bias=case["w13_bias"], w2_bias=case["w2_bias"])
    assert relative_error(out, bf16) < 0.1  # FP8's own error on this layer: a few %
