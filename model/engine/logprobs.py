"""Log probabilities of chosen tokens and of the most likely alternatives, computed on the device.

Which distribution (`LogprobsMode`, as vLLM's --logprobs-mode): RAW (default) is the model's own, log_softmax of the
logits before any sampling parameter; PROCESSED is the one the token was drawn from, after masks (grammar, allowed
and banned tokens, min_tokens), logit_bias, penalties, temperature, min_p, top-k and top-p (greedy rows: without
temperature). Prompt logprobs are always RAW: no sampling parameter applies to a prompt.

One step's results travel to the host with its sampled ids, behind the same event: no extra host synchronisation.
Rank = 1 + the number of tokens strictly more likely than the chosen one.
"""

import enum
from dataclasses import dataclass

import torch


class LogprobsMode(enum.Enum):
    RAW = "raw_logprobs"
    PROCESSED = "processed_logprobs"


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class LogprobsTensors:
    """Per row: the logprob and rank of its chosen token and its k best alternatives (k is the batch's largest)."""

    logprobs: torch.Tensor  # [N] float32
    ranks: torch.Tensor  # [N] int64
    top_ids: torch.Tensor  # [N, k] int64
    top_logprobs: torch.Tensor  # [N, k] float32

    @staticmethod
    def compute(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> "LogprobsTensors":
        """logprobs [N, V] (a log_softmax), chosen [N] token ids."""
        picked = logprobs.gather(1, chosen[:, None])  # [N, 1]
        ranks = (logprobs > picked).sum(dim=-1) + 1  # [N]
        if k > 0:
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, k]
        else:
            top_logprobs = logprobs.new_empty(logprobs.shape[0], 0)
            top_ids = chosen.new_empty(logprobs.shape[0], 0)
        return LogprobsTensors(picked[:, 0], ranks, top_ids, top_logprobs)

    def to_host(self) -> "LogprobsTensors":
        """Pinned host copies, enqueued without waiting (complete once the step's copy event has)."""
        if not self.logprobs.is_cuda:
            return self

        def copy(t: torch.Tensor) -> torch.Tensor:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=True)

        return LogprobsTensors(copy(self.logprobs), copy(self.ranks), copy(self.top_ids), copy(self.top_logprobs))

    def rows(self, chosen: list[int], ks: list[int | None]) -> list[TokenLogprobs | None]:
        """Host lists: row i with its ks[i] best alternatives (None where ks[i] is None)."""
        logprobs, ranks = self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_logprobs = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [None if k is None else
                TokenLogprobs(chosen[i], logprobs[i], ranks[i], list(zip(top_ids[i][:k], top_logprobs[i][:k])))
                for i, k in enumerate(ks)]
