"""`prefill_sdpa` (model/layers/prefill_sdpa.py): attention values against a float64 softmax written out here,
causal and masked, with DeepSeek's prefill widths (q/k 192, v zero-padded to 192); on the GPU, that cuDNN's attention
never runs and that the bf16 result keeps to the reference."""

import pytest
import torch

from model.layers.prefill_sdpa import prefill_sdpa


def reference(q, k, v, mask, scale):
    """softmax(q kᵀ · scale + mask) v in float64; mask [Lq, Lk] bool (True = attend)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v.double())


def inputs(b, h, lq, lk, d, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk)]


def test_causal_and_masked_calls_match_a_float64_softmax():
    q, k, v = inputs(2, 3, 7, 7, 16, "cpu", torch.float32, 0)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(prefill_sdpa(q, k, v, is_causal=True, scale=0.3),
                               reference(q, k, v, causal, 0.3).float(), rtol=1e-5, atol=1e-5)
    # a chunk continuing a cached prefix: 4 queries at positions 5..8 over 9 keys
    q, k, v = inputs(1, 2, 4, 9, 16, "cpu", torch.float32, 1)
    mask = torch.arange(9)[None, :] <= torch.arange(5, 9)[:, None]
    torch.testing.assert_close(prefill_sdpa(q, k, v, attn_mask=mask, scale=0.25),
                               reference(q, k, v, mask, 0.25).float(), rtol=1e-5, atol=1e-5)


def test_three_dimensional_inputs_are_refused():
    q, k, v = (t[0] for t in inputs(1, 2, 3, 3, 8, "cpu", torch.float32, 2))
    with pytest.raises(ValueError, match="4-D"):
        prefill_sdpa(q, k, v, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 16, 512, 512), (4, 16, 300, 300), (1, 16, 64, 700)])
def test_gpu_prefill_shapes_never_run_cudnn_attention(shape):
    from torch.profiler import ProfilerActivity, profile

    b, h, lq, lk = shape
    q, k, v = inputs(b, h, lq, lk, 192, "cuda", torch.bfloat16, lq)
    v[..., 128:] = 0  # v_head_dim 128 padded to the q/k width, as MLA's prefill does
    mask = None if lq == lk else torch.arange(lk, device="cuda")[None, :] <= torch.arange(lk - lq, lk, device="cuda")[:, None]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = prefill_sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, scale=192 ** -0.5)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [n for n in kernels if "cudnn" in n.lower()], kernels
    full = torch.ones(lq, lk, dtype=torch.bool, device="cuda").tril(lk - lq) if mask is None else mask
    expected = reference(q, k, v, full, 192 ** -0.5)
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err < 1e-2, err  # bf16 inputs and output: ~3e-3 expected
    assert not out[..., 128:].any(), "the zero value columns stay zero"
