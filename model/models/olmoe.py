"""OLMoE (OLMoE-1B-7B): q/k RMSNorm over the whole projection (before the head split), optional `clip_qkv`,
64 experts top-8 without renormalisation."""

from model.models.decoder import MoeCausalLM


class OlmoeForCausalLM(MoeCausalLM):
    model_type = "olmoe"
