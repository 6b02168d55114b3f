"""The generation engine: continuous batching over a paged KV cache, chunked prefill, preemption by recompute,
batched sampling, CUDA graphs for decode."""

from model.engine.config import EngineConfig
from model.engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from model.engine.moe_stats import MoeStatsSnapshot
from model.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "MoeStatsSnapshot", "RequestOutput", "SamplingParams"]
