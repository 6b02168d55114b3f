"""EngineConfig: every knob of the generation engine and its default, checked once at construction (the CLI
passes on only the flags it was given)."""

from dataclasses import dataclass

import torch

from model.dtypes import AUTO, check_dtype_name, resolve_dtype
from model.quant_config import check_quantization

# Chunked-prefill budget when none is given (why these values: benchmarks/NOTES.md, "Defaults measured here").
CUDA_BATCHED_TOKENS, CPU_BATCHED_TOKENS = 8192, 2048
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs")


@dataclass
class EngineConfig:
    model: str = "tiny"  # checkpoint directory or preset name
    random_weights: bool = False
    dtype: str = AUTO  # a model.dtypes name; "auto": bfloat16 on CUDA, float32 on CPU
    quantization: str = "none"  # "fp8": quantise a high-precision model at load (an FP8 checkpoint is FP8 anyway)
    device: str = "auto"  # "auto": cuda if available, else cpu
    max_num_seqs: int = 256  # sequences in one step (also the largest CUDA-graph batch)
    max_num_batched_tokens: int | None = None  # new tokens in one step (the chunked-prefill budget); None: by device
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from free GPU memory, or a CPU default
    max_model_len: int | None = None  # None: min(max_position_embeddings, KV capacity)
    enforce_eager: bool = False  # True: no CUDA graphs
    # CUDA graphs of the non-attention parts of steps that prefill, at bucketed row counts (piecewise_graphs.py):
    # +29% prefill at a 2048-token budget, mixed steps 2x faster on the H100 (benchmarks/NOTES.md, "Piecewise CUDA
    # graphs"). serve --no-piecewise-graphs turns them off.
    piecewise_graphs: bool = True
    async_scheduling: bool = True  # launch each step before the previous one's sampled ids are read back
    enable_prefix_caching: bool = True  # share the KV blocks of repeated prompt prefixes (model/engine/block_manager.py)
    # While sequences decode, a new prompt waits up to this many steps for others to prefill with it, so decode steps
    # stay CUDA-graph replays and one eager step prefills the group (model/engine/scheduler.py; 0: admit at once)
    prefill_hold_steps: int = 0
    expert_metrics: bool = True  # per-expert load and sampled MoE timing
    moe_timing_every: int = 16  # every n-th step's fused_moe time is read (event nodes in the decode graphs)
    gpu_memory_utilization: float = 0.9  # fraction of total GPU memory the engine may fill
    cpu_kv_cache_bytes: int = 64 << 20  # KV cache size when num_kv_blocks is None on the CPU
    seed: int = 0  # seeds the RNG of unseeded sampled requests
    # Which distribution logprobs report (model/engine/logprobs.py): "raw_logprobs" (the model's) or
    # "processed_logprobs" (the one sampled from, after every sampling parameter), as vLLM's --logprobs-mode.
    logprobs_mode: str = "raw_logprobs"

    def __post_init__(self):
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError as err:
                raise ValueError(f"bad device {self.device!r}: {err}") from None
            if kind not in ("cpu", "cuda"):  # torch parses meta, xpu, mps too; the load would fail on them
                raise ValueError(f"device {self.device!r}: the engine runs on auto, cpu, cuda or cuda:N")
        if self.max_num_batched_tokens is None:
            on_cuda = torch.cuda.is_available() if self.device == "auto" else torch.device(self.device).type == "cuda"
            self.max_num_batched_tokens = CUDA_BATCHED_TOKENS if on_cuda else CPU_BATCHED_TOKENS
        positive = dict(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                        block_size=self.block_size, moe_timing_every=self.moe_timing_every,
                        cpu_kv_cache_bytes=self.cpu_kv_cache_bytes)
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.prefill_hold_steps, int) or self.prefill_hold_steps < 0:
            raise ValueError(f"EngineConfig.prefill_hold_steps must be an int >= 0, got {self.prefill_hold_steps!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be None or a positive int, got {value!r}")
        for name in ("random_weights", "enforce_eager", "piecewise_graphs", "async_scheduling", "enable_prefix_caching",
                     "expert_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**64:  # torch.Generator.manual_seed's range
            raise ValueError(f"EngineConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in [0.05, 1], got {self.gpu_memory_utilization}")
        check_dtype_name(self.dtype)
        check_quantization(self.quantization)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        return device

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        return resolve_dtype(self.dtype, device)
