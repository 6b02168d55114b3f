"""Qwen3-MoE (e.g. Qwen3-30B-A3B): per-head q/k RMSNorm, no biases, softmax top-k routing renormalised when
`norm_topk_prob` is set, optional dense layers (`mlp_only_layers`, `decoder_sparse_step`)."""

from model.models.decoder import MoeCausalLM


class Qwen3MoeForCausalLM(MoeCausalLM):
    model_type = "qwen3_moe"
