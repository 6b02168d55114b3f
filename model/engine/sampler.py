"""Batched token sampling on the logits' device: greedy, temperature, top-k, top-p, per-request seeds.

Random rows use the exponential-race trick: argmax(p / q) with q ~ Exp(1) draws from p. Seeded rows draw their q
from their own torch.Generator, so a seeded request reproduces regardless of what it is batched with (and across
preemption: exactly one row of noise is drawn per generated token). Only the sampled ids are copied to the host.
"""

import torch

from model.engine.sampling_params import SamplingParams


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row parameters to the device without waiting for the stream (pinned staging on CUDA)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # for unseeded random rows
        self.generator.manual_seed(seed)

    def new_request_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        B, V = logits.shape
        if B != len(params) or B != len(generators):
            raise ValueError(f"{B} logit rows but {len(params)} params and {len(generators)} generators")
        if B == 0:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        greedy_ids = logits.argmax(dim=-1)  # [B]
        if all(p.greedy for p in params):
            return greedy_ids

        logits = logits.float()
        temps = _to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, logits.device)
        logits = logits / temps[:, None]  # [B, V]
        if any(p.uses_top_k or p.uses_top_p for p in params):
            logits = self._apply_top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)  # [B, V]

        noise = torch.empty_like(probs)  # [B, V]
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if len(seeded) < B:
            noise.exponential_(generator=self.generator)
        for i in seeded:
            noise[i].exponential_(generator=generators[i])
        sampled_ids = (probs / noise).argmax(dim=-1)  # [B]

        greedy_mask = _to_device([p.greedy for p in params], torch.bool, logits.device)
        return torch.where(greedy_mask, greedy_ids, sampled_ids)

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Mask (to -inf) everything outside each row's top-k, then outside the smallest prefix of mass >= top_p."""
        B, V = logits.shape
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(V, device=logits.device)[None, :]  # [1, V]
        ks = _to_device([min(p.top_k, V) if p.uses_top_k else V for p in params], torch.long, logits.device)
        mask = ranks >= ks[:, None]  # [B, V]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        if any(p.uses_top_p for p in params):
            ps = _to_device([p.top_p for p in params], torch.float32, logits.device)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [B, V]
            top_p_mask = mass_before >= ps[:, None]
            top_p_mask[:, 0] = False  # always keep the most likely token
            sorted_logits = sorted_logits.masked_fill(top_p_mask, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
