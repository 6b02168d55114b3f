"""GPU correctness of the FP8-weight MoE op (pytest -m gpu, on an H100/H200): the activation quantiser bit for bit
against the pure-torch rule, the layer against a float32 layer on the dequantised weights over real model shapes
and adversarial routings (error at most 2x that of the pure-torch reference with the same quantisation), poisoned
outputs, CUDA-graph replay with new routing, expert-load counts and bitwise determinism."""

import pytest
import torch

from model.kernels import extension, fused_moe
from model.kernels.activation import Activation, apply_activation
from model.kernels.fp8 import (
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    fused_moe_fp8_reference,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from benchmarks.moe_cases import FP8_EXPERT_SHAPES as SHAPES
from benchmarks.moe_cases import make_routing, relative_error
from tests.test_kernels_gpu import ROUTINGS, replay_with_new_routings

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_moe_layer")]  # the CUDA kernels, at T = 1 too

TOKENS = (1, 7, 64, 513, 4096)


def random_fp8_weights(E, H, I, gen):
    """Block-quantised random weights, one expert at a time (DeepSeek's bf16 w13 alone would be 7.5 GB)."""
    w13 = torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn, device="cuda")
    w2 = torch.empty(E, H, I, dtype=torch.float8_e4m3fn, device="cuda")
    s13 = torch.empty(E, 2 * I // 128, H // 128, device="cuda")
    s2 = torch.empty(E, H // 128, I // 128, device="cuda")
    for e in range(E):
        w13[e], s13[e] = quantize_fp8_blocks(torch.randn(2 * I, H, device="cuda", generator=gen) / H**0.5)
        w2[e], s2[e] = quantize_fp8_blocks(torch.randn(H, I, device="cuda", generator=gen) / I**0.5)
    return w13, s13, w2, s2


@pytest.fixture(scope="module")
def fp8_weights():
    cache = {}

    def get(name):
        if name not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            E, k, H, I = SHAPES[name]
            gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)))
            cache[name] = random_fp8_weights(E, H, I, gen)
        return cache[name]

    return get


def float32_layer(x, w13, s13, w2, s2, tw, ids, activation=Activation.SILU, b13=None, b2=None):
    """The layer in float32 on the dequantised weights and unquantised activations: what FP8 approximates. With
    gpt-oss's activation and biases too (test_kernels_gpu_swiglu_oai.py)."""
    T, H = x.shape
    k, inter = ids.shape[1], w2.shape[2]
    out = torch.zeros(T, H, device=x.device)
    flat = ids.reshape(-1).long()
    for e in flat.unique().tolist():
        rows = (flat == e).nonzero().flatten()
        gate_up = x[rows // k].float() @ dequantize_fp8_blocks(w13[e], s13[e]).t()
        if b13 is not None:
            gate_up = gate_up + b13[e].float()
        h = apply_activation(gate_up[:, :inter], gate_up[:, inter:], activation)
        y = h @ dequantize_fp8_blocks(w2[e], s2[e]).t()
        if b2 is not None:
            y = y + b2[e].float()
        out.index_add_(0, rows // k, y * tw.reshape(-1)[rows, None])
    return out


def run_poisoned(x, w13, s13, w2, s2, tw, ids, expert_load=None):
    """Our FP8 kernels with the output NaN-filled and every workspace byte 0xFF (NaN in bf16, fp32 and e4m3)."""
    T, H = x.shape
    out = torch.full_like(x, float("nan"))
    ws = extension.moe_workspace(T, ids.shape[1], w13.shape[0], H, w2.shape[2], x.device, fp8=True).fill_(0xFF)
    res = extension.fused_moe_fp8_cuda(x, w13, s13, w2, s2, tw, ids, expert_load, out=out, workspace=ws)
    torch.cuda.synchronize()
    return res


def check_layer(x, weights, tw, ids):
    w13, s13, w2, s2 = weights
    out = run_poisoned(x, w13, s13, w2, s2, tw, ids)
    assert not out.isnan().any(), "unwritten or NaN outputs"
    ref32 = float32_layer(x, w13, s13, w2, s2, tw, ids)
    same_quant = fused_moe_fp8_reference(x, w13, s13, w2, s2, tw, ids)  # pure torch, same quantisation
    err, err_ref = relative_error(out, ref32), relative_error(same_quant, ref32)
    assert err <= 2 * err_ref + 1e-4, f"relative error {err:.3e} vs same-quantisation pure torch {err_ref:.3e}"
    assert relative_error(out, same_quant) < 2e-2, "far from the reference with the same numerics"
    return err, err_ref


def test_activation_quantiser_matches_the_torch_rule_bitwise():
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(300, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    x[7, 128:256] = 0  # an all-zero group: tiny scale, zeros, no NaN
    x[9, :128] *= 1e4  # large values
    x[11, 512:640] *= 1e-30  # subnormal-range values
    q, scale = extension.quantize_rows_fp8_cuda(x)
    q_ref, scale_ref = quantize_fp8_groups(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert not dequantize_fp8_groups(q, scale).isnan().any()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp8_moe_matches_fp32_reference(shape, T, routing, fp8_weights):
    E, k, H, I = SHAPES[shape]
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh data every run
    tw, ids = make_routing(routing, T, E, k, gen)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    check_layer(x, fp8_weights(shape), tw.cuda(), ids.cuda())


@pytest.mark.parametrize("E,k,H,I,T,routing", [
    (6, 6, 384, 256, 97, "balanced"),     # H not a multiple of GEMM2's 256-wide tile: a ragged N half
    (3, 1, 128, 128, 1, "balanced"),      # the smallest FP8 shape
    (5, 3, 640, 384, 1100, "zipf"),       # cluster tiles (>= 512 rows per expert) with empty and partial halves
    (1024, 6, 256, 128, 300, "balanced"),  # the most experts
    (40, 11, 256, 128, 33, "sparse90"),   # k = 11: the combine reads slots in groups of 8
    # Tiles of one K step, ~15 a CTA: with STATICMOE_FP8_POSTED_TILES=1 GEMM2's ring of kStages + 1 tile slots
    # wraps with no slack (gpu_check.sh layer-knob-ab runs this file with each switch on)
    (8, 2, 128, 2048, 8192, "balanced"),  # GEMM1 (K = H = 128), cluster tiles
    (8, 2, 4096, 128, 8192, "balanced"),  # GEMM2 (K = I = 128), cluster tiles
    (64, 2, 128, 2048, 8192, "balanced"),  # GEMM1, 128-row tiles without a cluster
])
def test_fp8_odd_shapes(E, k, H, I, T, routing):
    gen = torch.Generator(device="cuda").manual_seed(T + E)
    weights = random_fp8_weights(E, H, I, gen)
    tw, ids = make_routing(routing, T, E, k, torch.Generator().manual_seed(T))
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    check_layer(x, weights, tw.cuda(), ids.cuda())


def test_fp8_graph_replay_with_new_routing_counts_load(fp8_weights):
    E, k, H, I = SHAPES["qwen3-30b-a3b"]
    w13, s13, w2, s2 = fp8_weights("qwen3-30b-a3b")
    T = 64
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    tw, ids = make_routing("balanced", T, E, k, torch.Generator().manual_seed(1))
    tw, ids = tw.cuda(), ids.cuda()
    load = torch.zeros(E, dtype=torch.int64, device="cuda")
    call = lambda: fused_moe(x, w13, w2, tw, ids, expert_load=load, w13_scale=s13, w2_scale=s2)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up outside capture (one-time attribute setup)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    replay_with_new_routings(graph, out, x, tw, ids, load, lambda: (
        float32_layer(x, w13, s13, w2, s2, tw, ids), fused_moe_fp8_reference(x, w13, s13, w2, s2, tw, ids)))


def test_fp8_deterministic_bitwise(fp8_weights):
    E, k, H, I = SHAPES["qwen3-30b-a3b"]
    w13, s13, w2, s2 = fp8_weights("qwen3-30b-a3b")
    tw, ids = make_routing("zipf", 2048, E, k, torch.Generator().manual_seed(3))
    x = torch.randn(2048, H, device="cuda", dtype=torch.bfloat16)
    a = fused_moe(x, w13, w2, tw.cuda(), ids.cuda(), w13_scale=s13, w2_scale=s2)
    b = fused_moe(x, w13, w2, tw.cuda(), ids.cuda(), w13_scale=s13, w2_scale=s2)
    assert torch.equal(a, b)
