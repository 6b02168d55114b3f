"""Checks of the two-launch decode MoE (model/kernels/triton_decode_moe.py), run under Triton's interpreter on the
CPU (tests/test_triton_decode_moe.py) and compiled on a GPU (tests/test_triton_decode_moe_gpu.py): outputs against a
float64 loop over the slots written here from the layer's definition, expert_load exact, poisoned outputs
overwritten, ids outside [0, E) skipped."""

import torch

from model.kernels.activation import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT, Activation
from model.kernels.triton_decode_moe import decode_moe


def float64_layer(x, w13, w2, wts, ids, activation, b13=None, b2=None, round_h_to=None):
    """out[t] = Σ_s w[t,s] · (w2[e] · act(w13[e] · x[t] + b13[e]) + b2[e]) in float64, slot by slot; slots whose id
    is outside [0, E) contribute nothing. `round_h_to`: h rounded to that dtype before GEMM2, as the kernels store
    it. Returns (out, spread) with spread[t] = Σ_s |w[t,s]| · |w2[e]| · |h|: what a relative change of h moves out
    by at most, for the rounding bound of `check`."""
    T, k = ids.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)
    spread = torch.zeros_like(out)
    for t in range(T):
        for s in range(k):
            e = int(ids[t, s])
            if not 0 <= e < E:
                continue
            gu = w13[e].double() @ x[t].double()
            if b13 is not None:
                gu = gu + b13[e].double()
            gate, up = gu[:inter], gu[inter:]
            if activation == Activation.SWIGLU_OAI:
                gate, up = gate.clamp(max=SWIGLU_OAI_LIMIT), up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
                h = (up + 1) * gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate)
            else:
                h = gate * torch.sigmoid(gate) * up
            if round_h_to is not None:
                h = h.to(round_h_to).double()
            y = w2[e].double() @ h
            if b2 is not None:
                y = y + b2[e].double()
            out[t] += float(wts[t, s]) * y
            spread[t] += abs(float(wts[t, s])) * (w2[e].double().abs() @ h.abs())
    return out, spread


def check(T, E, H, inter, k, dtype, activation="silu", bias=False, bad_ids=False, device="cpu", seed=0,
          blocks=None, **launch):
    """One random layer (`blocks`: the kernels' (BLOCK_I, BLOCK_H), default theirs; `launch`: decode_moe's
    num_warps / tiles); returns (out, expert_load)
    for callers that compare calls. Inputs and the float64 reference are made on `device` (on a GPU, Mixtral's
    weights take seconds to draw on the CPU)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    dt = getattr(torch, dtype)
    activation = Activation(activation)
    x = torch.randn(T, H, generator=g, device=dev).to(dt)
    w13 = (torch.randn(E, 2 * inter, H, generator=g, device=dev) / H ** 0.5).to(dt)
    w2 = (torch.randn(E, H, inter, generator=g, device=dev) / inter ** 0.5).to(dt)
    b13 = (torch.randn(E, 2 * inter, generator=g, device=dev) * 0.1).to(dt) if bias else None
    b2 = (torch.randn(E, H, generator=g, device=dev) * 0.1).to(dt) if bias else None
    ids = torch.stack([torch.randperm(E, generator=g, device=dev)[:k] for _ in range(T)]).to(torch.int32)  # [T, k]
    if bad_ids:
        ids[0, 0], ids[-1, -1] = E, -1  # route nowhere
    wts = torch.softmax(torch.randn(T, k, generator=g, device=dev), dim=-1)
    load = torch.full((E,), 7, dtype=torch.int64, device=dev)
    ref, spread = float64_layer(x, w13, w2, wts, ids, activation, b13, b2, round_h_to=dt)
    load_after = load.clone()  # a copy: `load` stays the count before the call
    out = decode_moe(x, w13, w2, wts, ids, load_after, activation, b13, b2, blocks=blocks, **launch)
    got = out.double()
    # h may round to the neighbouring value of the dtype (float32 vs float64 sums before the rounding: one ulp,
    # 2u relative), the output rounds once (u), float32 sums add ~1e-6 relative
    u = 2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -11
    tol = 2 * u * spread + u * ref.abs() + 1e-5 * spread + 1e-6  # [T, H], elementwise
    err = (got - ref).abs()
    assert (err <= tol).all(), (T, E, H, inter, k, dtype, activation, (err - tol).max().item())
    valid = ids[(ids >= 0) & (ids < E)].long()
    expected_load = load + torch.bincount(valid, minlength=E)
    assert torch.equal(load_after, expected_load), "expert_load must count each valid slot once"
    return out, load_after


def check_deterministic(device="cpu"):
    """The same call twice gives the same bits (the slots are summed in a fixed order)."""
    a, _ = check(5, 16, 256, 96, 4, "bfloat16", device=device, seed=3)
    b, _ = check(5, 16, 256, 96, 4, "bfloat16", device=device, seed=3)
    assert torch.equal(a, b)



def check_fp8(T, E, H, inter, k, activation="silu", bias=False, bad_ids=False, device="cpu", seed=0, blocks=None,
              **launch):
    """The FP8 variant (model/kernels/triton_decode_moe_fp8.py) against `fused_moe_fp8_reference` in float64 (the same
    quantisation rule, on the unrounded float64 sums). Where float32 and float64 sums straddle an e4m3 rounding
    boundary of h, one element of h moves by an e4m3 step (2^-3 relative); such flips are rare and their effect
    bounded by the layer's spread, so the bound is the bf16 output rounding plus a few flips' worth."""
    from model.kernels.fp8 import fused_moe_fp8_reference, quantize_fp8_blocks
    from model.kernels.triton_decode_moe_fp8 import decode_moe_fp8

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    activation = Activation(activation)
    x = torch.randn(T, H, generator=g, device=dev).bfloat16()
    w13, s13 = quantize_fp8_blocks(torch.randn(E, 2 * inter, H, generator=g, device=dev) / H ** 0.5)
    w2, s2 = quantize_fp8_blocks(torch.randn(E, H, inter, generator=g, device=dev) / inter ** 0.5)
    b13 = (torch.randn(E, 2 * inter, generator=g, device=dev) * 0.1).bfloat16() if bias else None
    b2 = (torch.randn(E, H, generator=g, device=dev) * 0.1).bfloat16() if bias else None
    ids = torch.stack([torch.randperm(E, generator=g, device=dev)[:k] for _ in range(T)]).to(torch.int32)
    if bad_ids:
        ids[0, 0], ids[-1, -1] = E, -1
    wts = torch.softmax(torch.randn(T, k, generator=g, device=dev), dim=-1)
    load = torch.zeros(E, dtype=torch.int64, device=dev)
    masked = ids.clone().masked_fill((ids < 0) | (ids >= E), 0)  # the reference needs in-range ids: weight 0 there
    ref_wts = wts.masked_fill((ids < 0) | (ids >= E), 0.0)
    ref = fused_moe_fp8_reference(x.double(), w13, s13, w2, s2, ref_wts.double(), masked, torch.float64,
                                  activation=activation, w13_bias=b13, w2_bias=b2)  # [T, H] float64
    out = decode_moe_fp8(x, w13, s13, w2, s2, wts, ids, load, activation, b13, b2, blocks=blocks, **launch)
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 2.0 ** -6 * scale, (T, E, H, inter, k, activation, err / scale)
    valid = ids[(ids >= 0) & (ids < E)].long()
    assert torch.equal(load, torch.bincount(valid, minlength=E)), "expert_load must count each valid slot"
    return err / scale
