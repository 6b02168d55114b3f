"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): QKV biases, and beside the routed experts a shared expert whose output is
scaled by sigmoid(shared_expert_gate(x)); routing weights are not renormalised unless `norm_topk_prob`."""

from model.models.decoder import MoeCausalLM


class Qwen2MoeForCausalLM(MoeCausalLM):
    model_type = "qwen2_moe"
