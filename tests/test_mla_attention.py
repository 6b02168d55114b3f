"""MLA attention (model/layers/mla_attention.py) against transformers' DeepseekV2Attention / DeepseekV3Attention,
one layer on its own, driven through the paged latent cache as the engine drives it: a whole prefill, chunked
prefill, decode steps (the absorbed form) and mixed steps, fp32 on the CPU. The absorbed decode reference is also
checked against a plain decompressed computation written here."""

import math

import pytest
import torch
import transformers
from torch import nn
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

from model.config import ModelConfig, YarnScaling
from model.layers.mla_attention import MlaAttention, rotate_pairs
from model.layers.mla_decode import mla_decode_reference
from model.layers.paged_attention import AttentionPlan, _decode_mask
from model.mla_config import MlaConfig
from tests.model_fixtures import PagedRunner

HIDDEN, HEADS, VOCAB = 64, 4, 40
SHAPE = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=0.8,
            mscale_all_dim=0.7, beta_fast=32, beta_slow=1)


def hf_attention(family: str, q_lora_rank, rope_interleave=True, yarn=False, seed=0):
    cls = transformers.DeepseekV2Config if family == "deepseek_v2" else transformers.DeepseekV3Config
    extra = {} if family == "deepseek_v2" else dict(rope_interleave=rope_interleave)
    if yarn:
        extra["rope_parameters"] = dict(YARN)
    config = cls(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                 q_lora_rank=q_lora_rank, max_position_embeddings=128, attention_bias=True, **SHAPE, **extra)
    config._attn_implementation = "eager"
    module = (hf_v2.DeepseekV2Attention if family == "deepseek_v2" else hf_v3.DeepseekV3Attention)(config, 0)
    rotary = (hf_v2.DeepseekV2RotaryEmbedding if family == "deepseek_v2" else hf_v3.DeepseekV3RotaryEmbedding)(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return config, module.eval(), rotary


def hf_cos_sin(family, rotary, positions):
    """cos, sin [n, D] in the rotate-half layout (halves repeated), from transformers' own rotary module."""
    x = torch.zeros(1, len(positions), 1)
    out = rotary(x, torch.tensor([positions]))
    if family == "deepseek_v2":  # complex freqs_cis [1, n, D/2]
        return torch.cat([out[0].real] * 2, -1), torch.cat([out[0].imag] * 2, -1)
    return out[0][0], out[1][0]


class OneLayer(nn.Module):
    """Our MLA layer with the engine's face: token ids pick rows of a fixed hidden-state table; the 'logits' are
    the attention output."""

    def __init__(self, hf_config, hf_module, family, rotary, rope_interleave=True, yarn=False):
        super().__init__()
        mla = MlaConfig(q_lora_rank=hf_config.q_lora_rank, rope_pairs=family == "deepseek_v2" or rope_interleave,
                        attention_bias=True, **SHAPE)
        rope_yarn = YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=0.8,
                                mscale_all_dim=0.7) if yarn else None
        config = ModelConfig(model_type=family, name="t", vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=1,
                             num_heads=HEADS, num_kv_heads=HEADS, head_dim=16, max_position_embeddings=128,
                             num_experts=2, top_k=1, moe_intermediate_size=8, intermediate_size=0,
                             norm_topk_prob=False, rms_norm_eps=1e-6, rope_theta=10000.0, rope_yarn=rope_yarn,
                             mla=mla)
        self.attn = MlaAttention(config, 0)
        missing, unexpected = self.attn.load_state_dict(hf_module.state_dict(), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.table = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(1))
        self.cos, self.sin = hf_cos_sin(family, rotary, list(range(128)))

    def kv_cache_shape(self, num_blocks, block_size):
        return (1, *self.attn.kv_cache_shape(num_blocks, block_size))

    def forward(self, batch, kv_cache):
        plan = AttentionPlan.build(batch, block_size=kv_cache.shape[2])
        rotary = self.cos[batch.positions].unsqueeze(1), self.sin[batch.positions].unsqueeze(1)
        out = self.attn(self.table[batch.input_ids], rotary, plan, kv_cache[0])
        return out[batch.logits_indices]


@torch.no_grad()
def hf_outputs(family, module, rotary, table, tokens):
    n = len(tokens)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    cos, sin = hf_cos_sin(family, rotary, list(range(n)))
    if family == "deepseek_v2":
        emb = rotary(torch.zeros(1, n, 1), torch.arange(n)[None])
    else:
        emb = (cos[None], sin[None])
    return module(table[tokens][None], position_embeddings=emb, attention_mask=mask)[0][0]  # [n, H]


CASES = [("deepseek_v2", None, True, False), ("deepseek_v2", 24, True, True), ("deepseek_v3", 24, True, True),
         ("deepseek_v3", None, False, False), ("deepseek_v3", 24, False, True)]


@pytest.mark.parametrize("family,q_lora_rank,interleave,yarn", CASES)
@torch.no_grad()
def test_prefill_decode_and_mixed_steps_match_transformers(family, q_lora_rank, interleave, yarn):
    config, module, rotary = hf_attention(family, q_lora_rank, interleave, yarn)
    if yarn:  # DeepSeek's softmax scale carries mscale(factor, mscale_all_dim)^2 (transformers' yarn_apply_mscale)
        assert module.scaling == pytest.approx(40**-0.5 * (0.1 * 0.7 * math.log(4.0) + 1) ** 2)
    ours = OneLayer(config, module, family, rotary, interleave, yarn)
    assert ours.attn.scale == pytest.approx(module.scaling, rel=1e-12)
    tokens = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = hf_outputs(family, module, rotary, ours.table, tokens)  # [30, H]
    # the whole prompt at once, then decode steps (absorbed form) padded to a fixed batch as CUDA graphs run them
    runner = PagedRunner(ours, num_blocks=64, block_size=4)
    got = [runner.step({"a": tokens[:20]}, all_logits=True)["a"]]
    for t in tokens[20:]:
        got.append(runner.step({"a": [t]}, pad_to=3)["a"])
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-5)
    # chunked prefill beside another sequence's decode steps (mixed steps)
    runner = PagedRunner(ours, num_blocks=64, block_size=4, seed=1)
    runner.step({"b": tokens[:9]})
    got = []
    for start in range(0, 30, 7):
        step = runner.step({"a": tokens[start : start + 7], "b": [tokens[9 + start // 7]]}, all_logits=True)
        got.append(step["a"])
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-4, atol=1e-5)
    b_expected = hf_outputs(family, module, rotary, ours.table, tokens[:14])[9:14]
    torch.testing.assert_close(step["b"][-1], b_expected[-1], rtol=1e-4, atol=1e-5)


def test_the_cache_holds_the_latent_and_rope_key_only():
    config, module, rotary = hf_attention("deepseek_v2", None)
    ours = OneLayer(config, module, "deepseek_v2", rotary)
    assert ours.kv_cache_shape(10, 16) == (1, 10, 16, 32 + 16)  # not heads × (K + V)


def test_rotate_pairs_is_transformers_complex_rotation_up_to_a_fixed_permutation():
    x = torch.randn(5, 3, 8)
    angles = torch.randn(5, 1, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    complex_rotated = torch.view_as_real(torch.view_as_complex(x.reshape(5, 3, 4, 2)) * torch.polar(
        torch.ones_like(angles), angles)).flatten(2)  # [5, 3, 8] interleaved
    permutation = list(range(0, 8, 2)) + list(range(1, 8, 2))  # evens, then odds
    torch.testing.assert_close(rotate_pairs(x, cos, sin), complex_rotated[..., permutation])


def test_absorbed_reference_equals_decompressed_attention():
    """softmax(q_lat·c + q_pe·k_pe) · c, then W_UV, equals attention with decompressed keys and values."""
    g = torch.Generator().manual_seed(3)
    heads, nope, rope, v_dim, rank, page = 3, 8, 4, 6, 16, 4
    lens = [5, 11, 1]
    w_uk, w_uv = torch.randn(heads, nope, rank, generator=g), torch.randn(heads, v_dim, rank, generator=g)
    cache = torch.randn(12, page, rank + rope, generator=g, dtype=torch.float64)
    tables = torch.tensor([[3, 7, 0], [1, 4, 9], [11, 0, 0]])
    q_nope = torch.randn(3, heads, nope, generator=g, dtype=torch.float64)
    q_pe = torch.randn(3, heads, rope, generator=g, dtype=torch.float64)
    lens_t = torch.tensor(lens)
    q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk.double())
    out = mla_decode_reference(torch.cat((q_latent, q_pe), -1), cache, tables, _decode_mask(lens_t, 12, None),
                               0.3, rank)
    out = torch.einsum("bhr,hvr->bhv", out, w_uv.double())
    for b, n in enumerate(lens):
        rows = cache[tables[b]].reshape(-1, rank + rope)[:n]  # [n, r + rope]
        k = torch.cat((torch.einsum("hnr,tr->htn", w_uk.double(), rows[:, :rank]),
                       rows[:, rank:].expand(heads, n, rope)), -1)  # [h, n, nope + rope]
        v = torch.einsum("hvr,tr->htv", w_uv.double(), rows[:, :rank])
        q = torch.cat((q_nope[b], q_pe[b]), -1)  # [h, nope + rope]
        p = torch.softmax(torch.einsum("hd,htd->ht", q, k) * 0.3, -1)
        torch.testing.assert_close(out[b], torch.einsum("ht,htv->hv", p, v), rtol=1e-10, atol=1e-10)
    assert math.isfinite(float(out.abs().sum()))
