"""The supported MoE families, by HF `model_type`."""

from model.models.decoder import MoeCausalLM
from model.models.mixtral import MixtralForCausalLM
from model.models.olmoe import OlmoeForCausalLM
from model.models.qwen2_moe import Qwen2MoeForCausalLM
from model.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[MoeCausalLM]] = {
    cls.model_type: cls
    for cls in (Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM)
}

__all__ = ["MODEL_CLASSES", "MixtralForCausalLM", "MoeCausalLM", "OlmoeForCausalLM",
           "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]
