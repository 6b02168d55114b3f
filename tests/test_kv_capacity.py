"""KV-cache capacity (model/kv_capacity.py) and the cache shape the engine allocates by attention kind: the numbers
are worked out by hand here from DeepSeek-V2-Lite's published shapes, not from the code under test."""

import torch

from model.config import ModelConfig
from model.decoder import MoeCausalLM
from model.kv_capacity import kv_capacity, main
from model.mla_config import MlaConfig

V2_LITE_MLA = MlaConfig(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, rope_pairs=True)


def v2_lite_shapes(**changes) -> ModelConfig:
    fields = dict(model_type="deepseek_v2", name="v2-lite", vocab_size=102400, hidden_size=2048, num_layers=27,
                  num_heads=16, num_kv_heads=16, head_dim=64, max_position_embeddings=163840, num_experts=64,
                  top_k=6, moe_intermediate_size=1408, intermediate_size=10944, norm_topk_prob=False,
                  rms_norm_eps=1e-6, rope_theta=10000.0, dense_layers=(0,), mla=V2_LITE_MLA)
    return ModelConfig(**{**fields, **changes})


def test_v2_lite_capacity_by_hand():
    config = v2_lite_shapes()
    cap = kv_capacity(config, 40 * 2**30, torch.bfloat16, block_size=16)
    # per token: 27 layers x (512 + 64) values x 2 bytes; uncompressed: 27 x 16 heads x (192 + 128) x 2
    assert cap.bytes_per_token == 27 * 576 * 2 == 31104
    assert cap.uncompressed_bytes_per_token == 27 * 16 * 320 * 2 == 276480
    # whole 16-token blocks, one kept for padding: floor(40 GiB / (31104 x 16)) = 86302, less 1 = 86301 blocks
    assert cap.tokens == (40 * 2**30 // (31104 * 16) - 1) * 16 == 1380816
    assert cap.uncompressed_tokens == (40 * 2**30 // (276480 * 16) - 1) * 16 == 155328
    assert 8.8 < cap.ratio < 9.0


def test_the_engine_allocates_the_latent_shape():
    with torch.device("meta"):
        mla, plain = MoeCausalLM(v2_lite_shapes()), MoeCausalLM(v2_lite_shapes(mla=None, head_dim=128))
    assert mla.kv_cache_shape(10, 16) == (27, 10, 16, 576)
    assert plain.kv_cache_shape(10, 16) == (27, 2, 10, 16, 16, 128)
    assert mla.kv_cache_bytes_per_block(16, torch.bfloat16) == 27 * 16 * 576 * 2
    cap = kv_capacity(v2_lite_shapes(), 2**30, torch.bfloat16, 16, model=mla)
    assert cap.bytes_per_token == 31104


def test_cli_reports_the_v2_lite_preset_beside_an_uncompressed_cache(capsys):
    main(["deepseek-v2-lite", "--memory-gib", "40"])
    out = capsys.readouterr().out
    assert "27 layers" in out
    assert "31,104 B/token" in out and "1,380,816 tokens" in out  # as worked out above
    assert "276,480 B/token" in out and "155,328 tokens" in out and "8.89x" in out
    main(["tiny", "--memory-gib", "1"])
    assert "ratio:         1.00x" in capsys.readouterr().out  # a GQA model: nothing compressed


def test_a_tensor_parallel_rank_keeps_the_whole_latent_but_would_split_decompressed_heads(capsys):
    cap = kv_capacity(v2_lite_shapes(), 40 * 2**30, torch.bfloat16, block_size=16, tensor_parallel=2)
    assert cap.bytes_per_token == 27 * 576 * 2  # the latent cache is replicated: the same on each of 2 ranks
    assert cap.uncompressed_bytes_per_token == 27 * 8 * 320 * 2 == 138240  # 8 of the 16 heads per rank
    # DeepSeek-V3 on 8 ranks: 61 layers x 576 x 2 bytes per token; decompressed 16 of 128 heads x (192 + 128)
    main(["deepseek-v3", "--memory-gib", "40", "--tensor-parallel", "8"])
    out = capsys.readouterr().out
    assert "per rank of 8" in out and "70,272 B/token" in out and "624,640 B/token" in out
    main(["qwen3-30b-a3b", "--memory-gib", "40", "--tensor-parallel", "8"])  # 4 K/V heads: one per rank of 8
    assert f"{48 * 2 * 1 * 128 * 2:,} B/token" in capsys.readouterr().out


def test_gpt_oss_capacity_credits_released_sliding_blocks_by_hand():
    """gpt-oss-20b's published shapes: 24 layers alternating window-128 and full, 8 KV heads of 64. Storage slots:
    12 (one per sliding + full pair), so a block id costs 12 layers x 2 x 8 x 64 values x 2 bytes per token = 24576 B,
    and the full group's blocks are all a long sequence keeps: twice the tokens of keeping every layer (49152 B)."""
    from model.loader import resolve_source

    config = resolve_source("gpt-oss-20b", random_weights=True)[0]
    cap = kv_capacity(config, 40 * 2**30, torch.bfloat16, block_size=16)
    assert cap.bytes_per_token == 12 * 2 * 8 * 64 * 2 == 24576
    assert cap.uncompressed_bytes_per_token == 24 * 2 * 8 * 64 * 2 == 49152
    assert cap.tokens == (40 * 2**30 // (24576 * 16) - 2) * 16  # two groups: two padding blocks
    assert cap.uncompressed_tokens == (40 * 2**30 // (49152 * 16) - 1) * 16
    assert cap.sliding_blocks_per_sequence == 128 // 16 + 1
    assert 1.99 < cap.ratio < 2.01
    with torch.device("meta"):
        assert MoeCausalLM(config).kv_cache_shape(10, 16) == (12, 2, 10, 16, 8, 64)
