"""SamplingParams: how one request picks its tokens, what it reports about them and when it stops.

Every field changes the output as documented in docs/service.md ("Parameters"); the HTTP layer refuses what this
engine cannot honour, so nothing here is accepted and then ignored.
"""

from dataclasses import dataclass, field
from typing import Any

# Below this a temperature counts as greedy. A tiny temperature rounds to 0 in float32, or overflows the scaled
# logits to inf: softmax then gives NaN and token 0 is sampled forever. None this small samples differently from
# greedy in practice (vLLM uses the same bound).
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for chat's top_logprobs)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI clamps biases to [-100, 100]
# A seed is any int64 (the API's range, as vLLM) or uint64 (so the API's seed + i for choice i fits past 2**63 - 1):
# what a torch.Generator takes. The sampler seeds with it mod 2**64: a negative int64 by two's complement.
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens
    # Penalties over the tokens generated so far (presence, frequency: OpenAI's definition) and, for repetition,
    # over the prompt too (the CTRL paper's: positive logits divided by it, negative ones multiplied).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # None = all
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # token sequences never completed
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = none; k >= 0: the sampled token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # A compiled grammar (model.engine.structured_output.Grammar) every output must match, or None.
    grammar: Any = None
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks (vLLM's field)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (-1 or 0 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64 - 1], got {self.seed!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {t!r}")
        self.logit_bias = dict(self.logit_bias or {})
        for t, bias in self.logit_bias.items():
            if not _is_int(t) or t < 0 or not _is_number(bias):
                raise ValueError(f"logit_bias maps token ids >= 0 to finite numbers, got {t!r}: {bias!r}")
        self.logit_bias = {t: max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(b))) for t, b in
                           self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
            if not self.allowed_token_ids or any(not _is_int(t) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
        self.bad_words_token_ids = [list(w) for w in self.bad_words_token_ids or []]
        if any(not w or any(not _is_int(t) or t < 0 for t in w) for w in self.bad_words_token_ids):
            raise ValueError("bad_words_token_ids must be non-empty lists of token ids")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValueError(f"cache_salt must be a string or None, got {self.cache_salt!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}")
        self.stop_token_id_set = frozenset(self.stop_token_ids)  # checked for every sampled token: O(1)
        # Read for every row of every step, so computed once: the sample depends on earlier tokens on the host
        # (a grammar's state, a bad word's prefix), and the row has any state of model/engine/sampling_state.py.
        self.needs_previous_tokens = self.grammar is not None or any(len(w) > 1 for w in self.bad_words_token_ids)
        self.has_row_state = bool(self.min_tokens or self.bad_words_token_ids or self.uses_penalties
                                  or self.grammar is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
