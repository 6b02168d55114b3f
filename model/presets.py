"""Named model shapes that need no download: real published configs (for `--random-weights` benchmarking) and the
embedded `tiny` model (always random, seeded; byte-level tokenizer) that runs anywhere, CPU included.

The dicts use `config.json` field names, so presets go through the same parser as checkpoints.
"""

TINY = "tiny"

def _gpt_oss(layers: int, experts: int) -> dict:
    """gpt-oss's config.json: both sizes share every field but the depth and the expert count."""
    return dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        num_local_experts=experts, num_experts_per_tok=4, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), rms_norm_eps=1e-5, attention_bias=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096),
        tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999, torch_dtype="bfloat16",
    )


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
    # deepseek-ai/DeepSeek-V2-Lite (15.7B, 2.4B active): MLA without q_lora_rank, 64 routed experts + 2 shared,
    # layer 0 dense. Its latent KV cache holds 576 values per token per layer (python -m model.kv_capacity).
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
        scoring_func="softmax", max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
        torch_dtype="bfloat16",
    ),
    # deepseek-ai/DeepSeek-V3 (671B without the MTP layer, 37B active): shapes only — for kernel and layer
    # benchmarks, capacity arithmetic and meta-device builds; its bf16 weights (1.3 TB) fit no single node here.
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8,
        topk_group=4, num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
        scoring_func="sigmoid", num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
    ),
    # zai-org/GLM-4.5-Air (106B total, 12B active without the embeddings; its MTP layer is not part of the preset):
    # 213 GB in bf16, so on one GPU only in FP8 (`--quantization fp8`): ~108 GB of weights on a 141 GB H200 (the
    # first layer's dense down projection, K = 10944 = 85.5 x 128, stays bf16), the rest (roughly 30 GB after
    # activations; not measured) for the KV cache at 188 KB per token (46 layers x 8 KV heads x 128 x K|V x bf16).
    # An 80 GB H100 holds it in neither precision.
    "glm-4.5-air": dict(
        model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, partial_rotary_factor=0.5,
        max_position_embeddings=131072, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, num_nextn_predict_layers=1, attention_bias=True, use_qk_norm=False,
        rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False, pad_token_id=151329,
        eos_token_id=[151329, 151336, 151338], torch_dtype="bfloat16",
    ),
    # openai/gpt-oss-20b (its config.json; transformers' GptOssConfig defaults are the 120b's 36 layers and 128
    # experts). Experts are MXFP4 in the published checkpoint, bf16 here.
    "gpt-oss-20b": _gpt_oss(layers=24, experts=32),
    # openai/gpt-oss-120b: the same layer with 128 experts, 36 layers.
    "gpt-oss-120b": _gpt_oss(layers=36, experts=128),
    # Small enough for CI and a laptop; Qwen3-MoE layout. Its vocabulary is the byte tokenizer's (259 ids).
    TINY: dict(
        model_type="qwen3_moe", vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=[258, 256], initializer_range=0.2,
    ),
}
