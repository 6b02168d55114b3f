"""q/k RMSNorm + rotary as one fused function (model/layers/qk_norm_rotary.py) inside Attention.project: against a
float64 reference written here from the models' definitions (Qwen3: RMSNorm per head; OLMoE: over the whole q and k
projections; then "rotate half" rotary), bit-identical to the unfused modules on the CPU, and the GPU's compiled
kernels within a bf16 implementation's own error of that reference."""

import pytest
import torch

from benchmarks.moe_cases import relative_error
from model.config import ModelConfig
from model.layers import fusion
from model.layers.attention import Attention
from model.layers.qk_norm_rotary import norm_rotary_qk
from model.layers.rotary import RotaryEmbedding, apply_rotary

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 32, 64


def make_attention(qk_norm: str, clip_qkv=None, device="cpu", dtype=torch.bfloat16, seed=0,
                   partial_rotary_factor=1.0) -> Attention:
    config = ModelConfig(model_type="t", name="t", vocab_size=8, hidden_size=HIDDEN, num_layers=1, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=256, num_experts=2,
                         top_k=1, moe_intermediate_size=8, intermediate_size=0, norm_topk_prob=False,
                         rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=qk_norm, clip_qkv=clip_qkv,
                         partial_rotary_factor=partial_rotary_factor)
    attn = Attention(config, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attn.parameters():  # fresh random values, norm weights around 1 (never zeros)
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else
                    torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return attn.to(device=device, dtype=dtype)


def reference(attn: Attention, x: torch.Tensor, positions: torch.Tensor, rotary_dim: int = HEAD_DIM):
    """float64 q, k [N, H, D] from the definitions: qkv projection, RMSNorm (per head or whole row), rotary of the
    first `rotary_dim` channels of each head ("rotate half" within them), the rest passed through."""
    w = attn.qkv_proj.weight.double()
    qkv = x.double() @ w.T
    q, k = qkv[:, : attn.q_size], qkv[:, attn.q_size: attn.q_size + attn.kv_size]

    def rms(t, weight):  # t [N, ..., C] over its last dim
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * weight.double()

    if attn.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM)
    if attn.qk_norm == "per_head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.double()[:, None] * inv_freq[None].to(positions.device)  # [N, D/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [N, 1, D/2]

    def rotate(t):
        a, b, rest = t[..., : rotary_dim // 2], t[..., rotary_dim // 2: rotary_dim], t[..., rotary_dim:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin, rest), dim=-1)

    return rotate(q), rotate(k)


def unfused(attn: Attention, x: torch.Tensor, rotary):
    """The modules one by one, as project() ran them before the fusion."""
    n = x.shape[0]
    q, k, _ = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if attn.qk_norm == "full":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.reshape(n, HEADS, HEAD_DIM), k.reshape(n, KV_HEADS, HEAD_DIM)
    if attn.qk_norm == "per_head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rotary(q, k, *rotary)


@pytest.mark.parametrize("qk_norm,rotary_dim", [("per_head", HEAD_DIM), ("full", HEAD_DIM),
                                                 ("per_head", HEAD_DIM // 2)])  # GLM-4.5 rotates half of each head
def test_project_fuses_norms_with_rotary_and_keeps_the_math(qk_norm, rotary_dim):
    attn = make_attention(qk_norm, partial_rotary_factor=rotary_dim / HEAD_DIM)
    assert attn._norms_fuse_with_rotary()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, HIDDEN, generator=gen).bfloat16()
    positions = torch.randint(0, 256, (9,), generator=gen)
    rotary = RotaryEmbedding(rotary_dim, 256, 10000.0)(positions, torch.bfloat16)
    q, k, v = attn.project(x, rotary)
    want_q, want_k = unfused(attn, x, rotary)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # same ops in the same order on the CPU
    ref_q, ref_k = reference(attn, x, positions, rotary_dim)
    assert relative_error(q, ref_q) < 2e-2 and relative_error(k, ref_k) < 2e-2
    assert v.shape == (9, KV_HEADS, HEAD_DIM)


def test_clipping_between_norm_and_rotary_keeps_the_unfused_path():
    attn = make_attention("full", clip_qkv=0.5)
    assert not attn._norms_fuse_with_rotary()
    x = torch.randn(3, HIDDEN).bfloat16()
    rotary = RotaryEmbedding(HEAD_DIM, 256, 10000.0)(torch.arange(3), torch.bfloat16)
    q, _, _ = attn.project(x, rotary)
    full_q = attn.q_norm(attn.qkv_proj(x)[:, : attn.q_size]).clamp(-0.5, 0.5).view(3, HEADS, HEAD_DIM)
    assert torch.equal(q, apply_rotary(full_q, full_q[:, :KV_HEADS], *rotary)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", ["per_head", "full"])
@pytest.mark.parametrize("n", [1, 7, 513])
def test_gpu_compiled_fusion_matches_float64_reference(qk_norm, n, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fusion, "_enabled", fusion.ALLOWED)
    monkeypatch.setattr(fusion, "EAGER_MIN_ROWS", 0)  # compiled at every size, not only inside graph capture
    if not fusion.ALLOWED:
        pytest.skip("STATICMOE_COMPILE=0: nothing is compiled")
    torch._dynamo.reset()  # below dynamo's recompile limit, so the compiled path really runs (not an eager fallback)
    counters.clear()
    attn = make_attention(qk_norm, device="cuda", seed=n)
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(n, HIDDEN, device="cuda", generator=gen).bfloat16()
    positions = torch.randint(0, 256, (n,), device="cuda", generator=gen)
    rotary = RotaryEmbedding(HEAD_DIM, 256, 10000.0).cuda()(positions, torch.bfloat16)
    q, k, _ = attn.project(x, rotary)
    ref_q, ref_k = reference(attn, x, positions)
    q_in, k_in, _ = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    eager_q, eager_k = norm_rotary_qk.eager(q_in.reshape(n, HEADS, HEAD_DIM), k_in.reshape(n, KV_HEADS, HEAD_DIM),
                                            attn.q_norm.weight, attn.k_norm.weight, 1e-6, *rotary)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the fused function
    assert relative_error(q, ref_q) <= 2 * relative_error(eager_q, ref_q) + 1e-6
    assert relative_error(k, ref_k) <= 2 * relative_error(eager_k, ref_k) + 1e-6
