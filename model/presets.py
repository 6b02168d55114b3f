"""Named model shapes that need no download: real published configs (for `--random-weights` benchmarking) and the
embedded `tiny` model (always random, seeded; byte-level tokenizer) that runs anywhere, CPU included.

The dicts use `config.json` field names, so presets go through the same parser as checkpoints.
"""

TINY = "tiny"

PRESETS: dict[str, dict] = {
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=151643, eos_token_id=151645,
        torch_dtype="bfloat16",
    ),
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5, rope_theta=10000.0, clip_qkv=None,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=None, eos_token_id=50279,
        torch_dtype="bfloat16",
    ),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
    ),
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen2-moe-a2.7b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        use_sliding_window=False, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
        torch_dtype="bfloat16",
    ),
    # Qwen/Qwen2-57B-A14B (context capped at 32768 here): the model that fits one 80 GB H100 only in FP8 — 57.4B
    # parameters are 115 GB in bf16, 58 GB in FP8 (experts, attention and shared experts; embeddings stay bf16),
    # which leaves ~15 GB for the KV cache. On a 141 GB H200 bf16 fits (with ~20 GB of KV), so there FP8 is what
    # triples the KV cache. Its K and N are whole 128-blocks (H 3584, I 2560, shared 20480, 28 x 128-dim heads).
    "qwen2-57b-a14b": dict(
        model_type="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        use_sliding_window=False, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
        torch_dtype="bfloat16",
    ),
    # openai/gpt-oss-20b (its config.json; transformers' GptOssConfig defaults are the 120b's 36 layers and 128
    # experts). Experts are MXFP4 in the published checkpoint, bf16 here.
    "gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12, rms_norm_eps=1e-5, attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096),
        tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999, torch_dtype="bfloat16",
    ),
    # openai/gpt-oss-120b: the same layer with 128 experts, 36 layers.
    "gpt-oss-120b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 18, rms_norm_eps=1e-5, attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096),
        tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999, torch_dtype="bfloat16",
    ),
    # Small enough for CI and a laptop; Qwen3-MoE layout. Its vocabulary is the byte tokenizer's (259 ids).
    TINY: dict(
        model_type="qwen3_moe", vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=[258, 256], initializer_range=0.2,
    ),
}
