"""Presence, frequency and repetition penalties, batched on the device with per-sequence state on the device.

Each sequence that uses a penalty owns a row of two device tables: how often each token occurs in its output so
far (`counts`) and which tokens its prompt holds (`in_prompt`). After every sample the sampled ids are added to
their rows on the device, so the counts are current even while the sampled ids are still on their way to the host
(asynchronous scheduling), and a step never ships token lists to the device. A row is reset on the device when it
is handed out; stream order puts that after any update still queued for its previous owner.

Definitions (as OpenAI and vLLM): presence subtracts `presence_penalty` from every token that occurred in the
output, frequency subtracts `frequency_penalty` x its count; repetition divides positive logits and multiplies
negative ones by `repetition_penalty` for every token in the prompt or the output.
"""

import torch

from model.engine.sampling_params import SamplingParams


def _put(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device, max_rows: int):
        self.vocab_size = vocab_size
        self.device = device
        self.max_rows = max_rows
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [R, V]
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [R, V]
        self.free: list[int] = []

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def _grow(self) -> None:
        """Double the tables (allocated on first use only: most traffic uses no penalty)."""
        old = self.capacity
        new = min(self.max_rows, max(8, 2 * old))
        if new <= old:
            raise RuntimeError(f"more than {self.max_rows} sequences use penalties at once")
        counts = torch.zeros(new, self.vocab_size, dtype=torch.int32, device=self.device)
        in_prompt = torch.zeros(new, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:old].copy_(self.counts)
        in_prompt[:old].copy_(self.in_prompt)
        self.counts, self.in_prompt = counts, in_prompt
        self.free.extend(range(new - 1, old - 1, -1))

    def acquire(self, prompt_ids: list[int], output_ids: list[int]) -> int:
        """A row for a sequence, filled with its prompt and the outputs it already has."""
        if not self.free:
            self._grow()
        row = self.free.pop()
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        if prompt_ids:
            self.in_prompt[row].index_fill_(0, _put(prompt_ids, torch.int64, self.device), True)
        if output_ids:
            ids = _put(output_ids, torch.int64, self.device)
            self.counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        return row

    def release(self, row: int) -> None:
        if row >= 0:
            self.free.append(row)

    def record(self, batch_rows: torch.Tensor, state_rows: torch.Tensor, sampled_ids: torch.Tensor) -> None:
        """counts[state_rows[i], sampled_ids[batch_rows[i]]] += 1 (device tensors of the penalised rows)."""
        if batch_rows.numel():
            self.counts.index_put_((state_rows, sampled_ids.index_select(0, batch_rows)),
                                   torch.ones_like(state_rows, dtype=torch.int32), accumulate=True)

    def apply(self, logits: torch.Tensor, batch_rows: torch.Tensor, state_rows: torch.Tensor,
              params: list[SamplingParams]) -> None:
        """Penalise `logits` [B, V] in place on its rows `batch_rows`; `params` are those rows' parameters."""
        dev = logits.device
        counts = self.counts.index_select(0, state_rows)  # [P, V]
        seen_out = counts > 0
        seen = seen_out | self.in_prompt.index_select(0, state_rows)  # [P, V]
        rows = logits.index_select(0, batch_rows)  # [P, V]
        rep = _put([p.repetition_penalty for p in params], torch.float32, dev)[:, None]  # [P, 1]
        freq = _put([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
        pres = _put([p.presence_penalty for p in params], torch.float32, dev)[:, None]
        rows = torch.where(seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
        rows = rows - freq * counts.to(rows.dtype) - pres * seen_out.to(rows.dtype)
        # A tiny repetition_penalty (1e-40 is accepted, as > 0) divides a logit past float32's range: +inf would make
        # the row's softmax NaN and every draw token 0; the largest float keeps it the most likely token instead.
        rows = rows.clamp(max=torch.finfo(rows.dtype).max)
        logits.index_copy_(0, batch_rows, rows)
