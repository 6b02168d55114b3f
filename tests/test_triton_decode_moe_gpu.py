"""The two-launch decode MoE (model/kernels/triton_decode_moe.py) compiled on the GPU at the presets' expert shapes:
against the float64 layer, against our CUDA kernel, in CUDA-graph replay with new routing, and through `fused_moe`
with STATICMOE_DECODE_MOE=1. CPU-side checks: tests/test_triton_decode_moe.py."""

import pytest
import torch

from model.kernels import extension, fused_moe, triton_decode_moe
from model.kernels.activation import ACTIVATION_CODES, Activation
from tests.decode_moe_checks import check, check_deterministic, check_fp8
from tests.triton_fixtures import switch_setter

pytestmark = [pytest.mark.gpu, pytest.mark.triton_only]  # the CUDA comparisons skip without the build

# name: (E, H, I, k, activation, biases)
PRESETS = {"olmoe": (64, 2048, 1024, 8, "silu", False), "qwen3-30b-a3b": (128, 2048, 768, 8, "silu", False),
           "mixtral": (8, 4096, 14336, 2, "silu", False), "gpt-oss-20b": (32, 2880, 2880, 4, "swiglu_oai", True)}


@pytest.fixture
def decode_on(monkeypatch):
    yield from switch_setter(monkeypatch, "STATICMOE_DECODE_MOE", triton_decode_moe.decode_moe_forced, initial="1")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_matches_the_float64_layer(name, T):
    E, H, inter, k, act, bias = PRESETS[name]
    if T * k > triton_decode_moe.DECODE_MAX_SLOTS:
        pytest.skip("beyond the decode cut")
    check(T, E, H, inter, k, "bfloat16", act, bias, bad_ids=T > 1, device="cuda", seed=T)


def test_float16_and_determinism():
    check(4, 64, 2048, 1024, 8, "float16", device="cuda")
    check_deterministic("cuda")


def _inputs(E, H, inter, k, T, act, bias, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    b13 = (0.1 * torch.randn(E, 2 * inter, device="cuda", generator=g)).bfloat16() if bias else None
    b2 = (0.1 * torch.randn(E, H, device="cuda", generator=g)).bfloat16() if bias else None
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)]).int()
    wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
    return x, w13, w2, wts, ids, dict(activation=act, w13_bias=b13, w2_bias=b2)


@pytest.mark.skipif(not torch.cuda.is_available() or not extension.available_for(torch.device("cuda")),
                    reason="the CUDA extension is not built for this GPU")
@pytest.mark.parametrize("name", PRESETS)
def test_agrees_with_the_cuda_kernel_and_replays_in_a_graph(decode_on, name):
    E, H, inter, k, act, bias = PRESETS[name]
    T = 2
    x, w13, w2, wts, ids, kw = _inputs(E, H, inter, k, T, act, bias, seed=11)
    assert triton_decode_moe.applies(x, w13, ids)
    load = torch.zeros(E, dtype=torch.int64, device="cuda")
    ours = fused_moe(x, w13, w2, wts, ids, load, **kw)  # the decode path (the switch is on)
    cuda = extension.fused_moe_cuda(x, w13, w2, wts, ids, None, activation=ACTIVATION_CODES[Activation(act)],
                                    w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"])
    torch.testing.assert_close(ours.float(), cuda.float(), rtol=2e-2, atol=2e-2 * cuda.float().abs().max().item())
    assert torch.equal(load, torch.bincount(ids.flatten().long(), minlength=E))

    # capture once, replay with new routing and new x written into the captured inputs
    static = [t.clone() for t in (x, wts, ids)]
    fused_moe(static[0], w13, w2, static[1], static[2], **kw)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13, w2, static[1], static[2], **kw)
    x2, _, _, wts2, ids2, _ = _inputs(E, H, inter, k, T, act, bias, seed=12)
    for dst, src in zip(static, (x2, wts2, ids2)):
        dst.copy_(src)
    out.fill_(float("nan"))  # poisoned: the replay must overwrite every element
    graph.replay()
    want = triton_decode_moe.decode_moe(x2, w13, w2, wts2, ids2, None, Activation(act), kw["w13_bias"],
                                        kw["w2_bias"])
    assert torch.equal(out, want)


# name: (E, H, I, k) of issue 16's FP8 grid
FP8_PRESETS = {"qwen3-30b-a3b": (128, 2048, 768, 8), "qwen3-235b-a22b": (128, 4096, 1536, 8),
               "deepseek-v3": (256, 7168, 2048, 8), "mixtral": (8, 4096, 14336, 2)}


@pytest.mark.parametrize("name", FP8_PRESETS)
@pytest.mark.parametrize("T", [1, 8])
def test_fp8_matches_the_float64_reference(name, T):
    E, H, inter, k = FP8_PRESETS[name]
    if T * k > triton_decode_moe.DECODE_MAX_SLOTS:
        pytest.skip("beyond the decode cut")
    check_fp8(T, E, H, inter, k, bad_ids=T > 1, device="cuda", seed=T)


@pytest.mark.skipif(not torch.cuda.is_available() or not extension.available_for(torch.device("cuda")),
                    reason="the CUDA extension is not built for this GPU")
def test_fp8_agrees_with_the_cuda_kernel_and_replays_in_a_graph(decode_on):
    from model.kernels.fp8 import quantize_fp8_blocks

    E, H, inter, k = FP8_PRESETS["qwen3-30b-a3b"]
    x, w13, w2, wts, ids, _ = _inputs(E, H, inter, k, 2, "silu", False, seed=21)
    (w13q, s13), (w2q, s2) = quantize_fp8_blocks(w13), quantize_fp8_blocks(w2)
    assert triton_decode_moe.applies(x, w13q, ids)
    ours = fused_moe(x, w13q, w2q, wts, ids, w13_scale=s13, w2_scale=s2)
    cuda = extension.fused_moe_fp8_cuda(x, w13q, s13, w2q, s2, wts, ids, None)
    torch.testing.assert_close(ours.float(), cuda.float(), rtol=3e-2, atol=3e-2 * cuda.float().abs().max().item())

    static = [t.clone() for t in (x, wts, ids)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(static[0], w13q, w2q, static[1], static[2], w13_scale=s13, w2_scale=s2)
    x2, _, _, wts2, ids2, _ = _inputs(E, H, inter, k, 2, "silu", False, seed=22)
    for dst, src in zip(static, (x2, wts2, ids2)):
        dst.copy_(src)
    out.fill_(float("nan"))
    graph.replay()
    want = fused_moe(x2, w13q, w2q, wts2, ids2, w13_scale=s13, w2_scale=s2)
    assert torch.equal(out, want)


@pytest.mark.parametrize("name", ["olmoe", "qwen3-30b-a3b", "gpt-oss-20b"])
@pytest.mark.parametrize("T", [1, 8])
def test_one_launch_matches_the_float64_layer(name, T):
    """STATICMOE_DECODE_MOE_ONE_LAUNCH's kernel: `_down` programs wait in-kernel for their token's `_up` programs."""
    E, H, inter, k, act, bias = PRESETS[name]
    if T * k > triton_decode_moe.DECODE_MAX_SLOTS:
        pytest.skip("beyond the decode cut")
    check(T, E, H, inter, k, "bfloat16", act, bias, bad_ids=T > 1, device="cuda", seed=T, one_launch=True)
    check(T, E, H, inter, k, "bfloat16", act, bias, device="cuda", seed=T + 1, one_launch=True, tiles=(4096, 8192))
    assert triton_decode_moe.one_launch_counters(torch.device("cuda")).eq(0).all()


def test_one_launch_replays_in_a_graph_with_its_counters_reset():
    E, H, inter, k, act, bias = PRESETS["qwen3-30b-a3b"]
    x, w13, w2, wts, ids, kw = _inputs(E, H, inter, k, 4, act, bias, seed=31)
    run = (lambda xx, ww, ii: triton_decode_moe.decode_moe(xx, w13, w2, ww, ii, None, Activation(act),
                                                           one_launch=True))
    run(x, wts, ids)  # outside capture: compiles, allocates the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(x, wts, ids)
    for seed in (32, 33, 34):  # each replay must find the counters at zero again
        x2, _, _, wts2, ids2, _ = _inputs(E, H, inter, k, 4, act, bias, seed=seed)
        for dst, src in zip((x, wts, ids), (x2, wts2, ids2)):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        two = triton_decode_moe.decode_moe(x2, w13, w2, wts2, ids2, None, Activation(act), one_launch=False)
        torch.testing.assert_close(out, two, rtol=1e-2, atol=1e-2 * two.float().abs().max().item())
    assert triton_decode_moe.one_launch_counters(torch.device("cuda")).eq(0).all()
