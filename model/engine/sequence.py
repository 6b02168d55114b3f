"""Sequence: one request's tokens, its place in the KV cache and its progress through the engine."""

import enum

import torch

from model.engine.sampling_params import SamplingParams


PENDING_TOKEN = -1  # placeholder in token_ids for a token sampled on the device and not yet read back


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the KV cache (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_index: int,
                 generator: torch.Generator | None = None):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_index = arrival_index  # lower = older = higher priority (FCFS)
        self.generator = generator  # per-request RNG when params.seed is set
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        # KV block ids in token order, one table per KV-cache group (model/kv_groups.py); [] while it holds none.
        # A sliding group's released entries (behind its window) are that group's null block.
        self.block_tables: list[list[int]] = []
        self.window_starts: list[int] = []  # per group: leading table entries released (0 for a full group)
        self.block_row = -1  # its row of BlockManager.tables while it holds blocks
        # Prefix caching (model/engine/prefix_hash.py): anything besides the tokens that changes their K/V or must
        # keep requests apart (an adapter id, a tenant) goes into `cache_salt`: the request's own (vLLM's field).
        self.cache_salt = (params.cache_salt or "").encode("utf-8")
        self.block_hashes: list[bytes] = []  # chained hash of each full block of known tokens, in order
        self.num_committed_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.cache_generation = 0  # the block manager's reset count when it took its first blocks (commit checks)
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at its first admission
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: tuple[str, str] | None = None  # (code, message) of an "error" end: no valid next token
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        self.stopped_after_text = False  # its last token is text that completed its grammar (not a stop token)
        self.detokenizer = None  # IncrementalDetokenizer, set by the engine
        self.num_preemptions = 0
        self.waiting_since = 0  # the scheduler's step count when it joined the waiting queue
        self.num_emitted_tokens = 0  # output tokens already handed out in RequestOutputs
        # Asynchronous scheduling (model/engine/llm_engine.py): the next step may be launched before the sampled
        # token of this one is read back. Until then token_ids ends in PENDING_TOKEN, and the next step feeds the
        # token straight from row `pending_row` of the device tensor of sampled ids.
        self.num_pending = 0  # PENDING_TOKEN placeholders in token_ids
        self.pending_row = -1  # row of the latest placeholder's token in its step's sampled ids
        self.final_in_flight = False  # its last token (max_tokens or max_model_len) is being sampled
        # Sampling state (model/engine/sampling_state.py): its penalty-table row, its grammar matcher.
        self.penalty_row = -1
        self.matcher = None
        # Prompt logprobs (params.prompt_logprobs): positions whose logits were requested so far (a recompute
        # after preemption does not ask again), and the results not yet handed out.
        self.prompt_logprob_positions = 0
        self.prompt_logprobs: list = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        """Group 0's table (the only one of a model without sliding layers). Every group's has this length."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is missing from the cache: the next step feeds exactly one token."""
        return self.status == SequenceStatus.RUNNING and self.num_uncomputed_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: the cache content is dropped; prompt + outputs so far are prefilled again."""
        self.num_computed_tokens = 0
        self.block_tables, self.window_starts = [], []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
