"""Checks of the fused q/k norm + rotary + K/V cache write (model/layers/triton_norm_rotary_write.py) against the
unfused modules (`norm_rotary_qk.eager` / `apply_rotary.eager`, then a row-by-row cache copy), shared by the CPU
test (Triton's interpreter) and the GPU test (compiled)."""

import torch

from model.layers.norm import rms_norm
from model.layers.rotary import RotaryEmbedding, apply_rotary
from model.layers.triton_norm_rotary_write import norm_rotary_write


def unfused(qkv, hq, hkv, d, norm, q_w, k_w, eps, cos, sin):
    """q, k, v [N, H, D] as Attention.project computes them without fusion."""
    n = qkv.shape[0]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    if norm == "full":
        q, k = rms_norm.eager(q, q_w, eps), rms_norm.eager(k, k_w, eps)
    q, k, v = q.reshape(n, hq, d), k.reshape(n, hkv, d), v.reshape(n, hkv, d)
    if norm == "per_head":
        q, k = rms_norm.eager(q, q_w, eps), rms_norm.eager(k, k_w, eps)
    q, k = apply_rotary.eager(q, k, cos, sin)
    return q, k, v


def ulps_apart(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable 16-bit values lie between got and want (same sign region)."""
    to_int = (lambda t: t.view(torch.int16).to(torch.int32))
    a, b = to_int(got.contiguous()), to_int(want.contiguous())
    a = torch.where(a < 0, -(a & 0x7FFF), a)  # sign-magnitude -> a monotone integer line
    b = torch.where(b < 0, -(b & 0x7FFF), b)
    return (a - b).abs()


def check(n, hq, hkv, d, norm, rotary_dim, dtype="bfloat16", device="cpu", pad=False):
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(n * 131 + hq * 7 + d + len(norm) + rotary_dim)
    qkv_full = (2 * torch.randn(n, (hq + 2 * hkv) * d + 8, generator=g)).to(device, dtype)
    qkv = qkv_full[:, 8:]  # a view with a row stride wider than its width, as a sliced projection may be
    widths = {"none": (1, 1), "per_head": (d, d), "full": (hq * d, hkv * d)}[norm]
    q_w, k_w = ((1 + 0.3 * torch.randn(w, generator=g)).to(device, dtype) for w in widths)  # never all ones
    eps = 1e-6
    positions = torch.randint(0, 512, (n,), generator=g).to(device)
    cos, sin = RotaryEmbedding(rotary_dim, 512, 10000.0).to(device)(positions, dtype)
    slots = 3 * n + 4
    k_cache = torch.randn(slots, hkv, d, generator=g).to(device, dtype)  # poison: every written slot must change
    v_cache = torch.randn(slots, hkv, d, generator=g).to(device, dtype)
    write_slots = torch.randperm(slots, generator=g)[:n]
    write_rows = torch.arange(n)
    if pad and n > 2:  # the last row pads: it re-writes row 0 to row 0's slot (AttentionPlan.build)
        write_rows[-1], write_slots[-1] = 0, write_slots[0]
    write_rows, write_slots = write_rows.to(device), write_slots.to(device)
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    want_q, want_k, want_v = unfused(qkv, hq, hkv, d, norm, q_w, k_w, eps, cos, sin)
    for row, slot in zip(write_rows.tolist(), write_slots.tolist()):
        want_k_cache[slot], want_v_cache[slot] = want_k[row], want_v[row]

    q = norm_rotary_write(qkv, hq, hkv, d, norm, q_w, k_w, eps, cos, sin, k_cache, v_cache, write_rows, write_slots)
    case = (n, hq, hkv, d, norm, rotary_dim, dtype, pad)
    assert torch.equal(v_cache, want_v_cache), case  # V is copied as is
    for got, want in ((q, want_q), (k_cache, want_k_cache)):
        apart = ulps_apart(got, want)
        # only the float32 statistics' summation order differs from eager: a rounding flips now and then
        assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.02, (case, apart.max(), (apart > 0).sum())


def check_layer(qk_norm: str, device: str = "cpu", rotary_dim: int | None = None):
    """Attention.forward of a decode batch (three sequences and a padding row) with the one-launch path and without:
    the same output and the same cache, every other cache slot untouched."""
    from model.forward_batch import ForwardBatch
    from model.layers.attention import Attention
    from model.layers.paged_attention import AttentionPlan
    from tests.test_qk_norm_rotary import HEAD_DIM, HIDDEN, make_attention

    rotary_dim = rotary_dim or HEAD_DIM
    attn = make_attention(qk_norm, device=device, seed=3, partial_rotary_factor=rotary_dim / HEAD_DIM)
    g = torch.Generator().manual_seed(4)
    block_size, lens = 4, [5, 2, 9]
    tables = torch.tensor([[3, 0, 0], [1, 0, 0], [5, 2, 4]], dtype=torch.int32)
    slots = [int(tables[s, (n - 1) // block_size]) * block_size + (n - 1) % block_size for s, n in enumerate(lens)]
    batch = ForwardBatch(
        input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.tensor([4, 1, 8, 0]),
        slot_mapping=torch.tensor(slots + [-1]), block_tables=torch.cat([tables, tables[:1]]),
        context_lens=torch.tensor(lens + [1], dtype=torch.int32), query_start_loc=torch.arange(5, dtype=torch.int32),
        logits_indices=torch.arange(4), is_decode=True, query_lens_host=[1] * 4, context_lens_host=lens + [1])
    batch = ForwardBatch(**{f: (v.to(device) if torch.is_tensor(v) else v) for f, v in vars(batch).items()})
    plan = AttentionPlan.build(batch, block_size)
    x = torch.randn(4, HIDDEN, generator=g).to(device, torch.bfloat16)
    rotary = RotaryEmbedding(rotary_dim, 256, 10000.0).to(device)(batch.positions, torch.bfloat16)
    cache = torch.randn(attn.kv_cache_shape(6, block_size), generator=g).to(device, torch.bfloat16)
    results, original = [], Attention._one_launch_to_cache
    try:
        for fused in (True, False):  # the switch aside: on the CPU only the interpreter can run the kernel
            Attention._one_launch_to_cache = (lambda self, qkv, kv: True) if fused else (lambda self, qkv, kv: False)
            kv = cache.clone()
            results.append((attn(x, rotary, plan, kv), kv))
    finally:
        Attention._one_launch_to_cache = original
    (out, kv), (want_out, want_kv) = results
    if device == "cpu":  # the interpreter and eager torch sum the statistics alike: the same bits
        assert torch.equal(out[:3], want_out[:3]) and torch.equal(kv, want_kv), qk_norm
    else:  # compiled: a rounding of K may flip (check's bound), and the attention output follow it
        apart = ulps_apart(kv, want_kv)
        assert apart.max() <= 1 and (apart > 0).float().mean() <= 0.02, (qk_norm, apart.max())
        assert (out[:3] - want_out[:3]).abs().max() <= 2e-2 * want_out[:3].abs().max(), qk_norm
    written = torch.zeros(6 * block_size, dtype=torch.bool)
    written[slots] = True
    for half in (0, 1):  # the steps' slots changed, no other
        changed = (kv[half] != cache[half]).flatten(2).any(-1).flatten()
        assert torch.equal(changed.cpu(), written), (qk_norm, half)

