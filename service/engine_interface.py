"""ServingEngine: what the service uses of the engine, as a typing.Protocol (model.engine.LLMEngine implements it).

service/engine_client.py is written against this and nothing else, so a reader and a type checker can follow every
call it makes; tests hand it a real LLMEngine (or one with a step that sleeps or raises)."""

from __future__ import annotations

from typing import Protocol

import torch

from model.engine import EngineStats, MoeStatsSnapshot, RequestOutput, SamplingParams
from model.tokenizer import Tokenizer


class ModelShape(Protocol):
    vocab_size: int  # ids the embedding accepts (may exceed the tokenizer's)
    num_layers: int
    num_experts: int


class WorkerRanks(Protocol):
    """The other ranks of a parallel model; `failure` says why one died (set by its watchdog thread)."""

    failure: str | None


class ServingEngine(Protocol):
    tokenizer: Tokenizer
    model_config: ModelShape
    max_model_len: int
    eos_token_ids: list[int]  # the model's and the tokenizer's (structured output allows them once complete)
    device: torch.device
    dtype: torch.dtype
    kernel_path: str  # which MoE kernel runs, for the start-up log
    workers: WorkerRanks | None  # None for a model on one rank

    # Called from the engine thread only (the engine has no locks of its own).
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    prompt_checked: bool = False) -> None: ...

    def abort_request(self, request_id: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def stats(self) -> EngineStats: ...

    def moe_stats(self) -> MoeStatsSnapshot: ...
