"""Batched token sampling on the logits' device, with no host synchronisation and fixed shapes.

Order of the logit edits (as vLLM v1): grammar bitmask, allowed_token_ids, bans (min_tokens, bad words), logit_bias,
penalties; then greedy rows take the argmax, the others are divided by their temperature, cut by min_p, top-k and
top-p, and drawn. Random rows use the exponential-race trick: argmax(p / q) with q ~ Exp(1) draws from p. Seeded
rows draw their q from their own torch.Generator, so a seeded request reproduces regardless of what it is batched
with (and across preemption: exactly one row of noise is drawn per generated token).

What the host decides per step (which tokens a row bans, the grammar masks, the penalty-state rows) comes in
`SamplingExtras`; everything is applied by batched device ops. Logprobs (model/engine/logprobs.py) are computed
here from the same logits, before the edits (raw) or after them (processed).

A row whose edits leave no token allowed (every logit -inf: contradictory constraints, or a grammar that allows
nothing) has no valid sample; `SamplerOutput.no_token` flags it on the device (no host sync: the engine copies it
back with the sampled ids) and the engine ends that sequence with an error instead of emitting the token.
"""

from dataclasses import dataclass, field

import torch

from model.engine import logit_masks
from model.engine.logprobs import LogprobsMode, LogprobsTensors
from model.engine.penalties import PenaltyState
from model.engine.sampling_params import SamplingParams


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row parameters to the device without waiting for the stream (pinned staging on CUDA)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


@dataclass
class SamplingExtras:
    """Per-step state of the rows, decided on the host."""

    banned: list[tuple[int, int]] = field(default_factory=list)  # (row, token id) set to -inf
    penalty_rows: list[int] | None = None  # PenaltyState row per batch row (-1: none)
    grammar_rows: list[int] = field(default_factory=list)  # rows constrained by `grammar_bitmask`
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_rows), ceil(V / 32)] int32, host


@dataclass
class SamplerOutput:
    sampled_ids: torch.Tensor  # [B] int64 on the device
    logprobs: LogprobsTensors | None = None  # rows of the batch; None when no row asked
    no_token: torch.Tensor | None = None  # [B] bool on the device: the row's edits allowed no token (its id is
    # meaningless); None when no row was masked


def _generator_seed(seed: int) -> int:
    """The uint64 a generator is seeded with: the seed mod 2**64 (a negative int64 by two's complement), then mixed
    by a bijection (the splitmix64 finaliser). Every int64 seed keeps its own stream on CUDA (Philox reads all 64
    bits), and the CPU generator, which reads only the low 32, no longer folds seeds that share them (-1 and
    2**63 - 1, -2**63 and 0) onto one stream."""
    z = seed % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, logprobs_mode: LogprobsMode = LogprobsMode.RAW,
                 penalties: PenaltyState | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # for unseeded random rows
        self.generator.manual_seed(seed)
        self.logprobs_mode = logprobs_mode
        self.penalties = penalties

    def new_request_generator(self, seed: int) -> torch.Generator:
        """A seeded request's own RNG, from any int64 or uint64 seed (SamplingParams.seed)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(_generator_seed(seed))
        return g

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               extras: SamplingExtras | None = None) -> SamplerOutput:
        B, V = logits.shape
        if B != len(params) or B != len(generators):
            raise ValueError(f"{B} logit rows but {len(params)} params and {len(generators)} generators")
        if B == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.long, device=logits.device))
        extras = extras or SamplingExtras()
        k_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        raw = None
        if k_logprobs is not None and self.logprobs_mode is LogprobsMode.RAW:
            raw = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        masked = bool(extras.grammar_rows or extras.banned or any(p.allowed_token_ids is not None for p in params))
        logits = self._edit(logits, params, extras)  # [B, V] float32 (a new tensor when edited)
        no_token = torch.isneginf(logits).all(dim=-1) if masked else None  # [B]
        greedy_ids = logits.argmax(dim=-1)  # [B]
        all_greedy = all(p.greedy for p in params)
        processed = logits
        # Greedy rows' processed logprobs include their min_p / top-k / top-p cuts as in a mixed batch, so they
        # do not depend on what the row is batched with
        if not all_greedy or (k_logprobs is not None and raw is None):
            processed = self._process(logits, params)
        if all_greedy:
            sampled = greedy_ids
        else:
            sampled = self._draw(processed, params, generators, greedy_ids)
        self._record_penalties(extras, sampled)
        out = SamplerOutput(sampled, no_token=no_token)
        if k_logprobs is not None:
            source = raw if raw is not None else torch.log_softmax(processed, dim=-1)
            out.logprobs = LogprobsTensors.compute(source, sampled, k_logprobs)
        return out

    # ---- logit edits --------------------------------------------------------------------------------------------
    def _edit(self, logits: torch.Tensor, params: list[SamplingParams], extras: SamplingExtras) -> torch.Tensor:
        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
        penalised = [i for i, r in enumerate(extras.penalty_rows or []) if r >= 0]
        if not (extras.grammar_rows or allowed_rows or extras.banned or bias or penalised):
            return logits.float()
        logits = logits.to(torch.float32, copy=True)  # the caller's logits may be a CUDA graph's static output
        logit_masks.apply_bitmask(logits, extras.grammar_rows, extras.grammar_bitmask)
        logit_masks.allow_only(logits, allowed_rows, [params[i].allowed_token_ids for i in allowed_rows])
        logit_masks.ban(logits, extras.banned)
        logit_masks.add_bias(logits, bias)
        if penalised:
            batch_rows = _to_device(penalised, torch.int64, logits.device)
            state_rows = _to_device([extras.penalty_rows[i] for i in penalised], torch.int64, logits.device)
            self.penalties.apply(logits, batch_rows, state_rows, [params[i] for i in penalised])
        return logits

    def _record_penalties(self, extras: SamplingExtras, sampled: torch.Tensor) -> None:
        penalised = [i for i, r in enumerate(extras.penalty_rows or []) if r >= 0]
        if penalised:
            batch_rows = _to_device(penalised, torch.int64, sampled.device)
            state_rows = _to_device([extras.penalty_rows[i] for i in penalised], torch.int64, sampled.device)
            self.penalties.record(batch_rows, state_rows, sampled)

    # ---- drawing ------------------------------------------------------------------------------------------------
    def _process(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """The final logits [B, V] rows are drawn from: temperature (greedy rows: none), min_p, top-k, top-p."""
        temps = _to_device([p.temperature if not p.greedy else 1.0 for p in params], torch.float32, logits.device)
        logits = logits / temps[:, None]  # [B, V]
        if any(p.min_p > 0.0 for p in params):
            logits = self._apply_min_p(logits, params)
        if any(p.uses_top_k or p.uses_top_p for p in params):
            logits = self._apply_top_k_top_p(logits, params)
        return logits

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
              greedy_ids: torch.Tensor) -> torch.Tensor:
        """Sampled ids [B] from the processed `logits` (greedy rows: `greedy_ids`)."""
        B = logits.shape[0]
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
    def _apply_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Mask tokens whose probability is below min_p x the row's largest (after temperature)."""
        min_p = _to_device([p.min_p for p in params], torch.float32, logits.device)[:, None]  # [B, 1]
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Mask (to -inf) everything below each row's k-th largest logit, then outside the smallest prefix of mass
        >= top_p. Tokens tied with the k-th largest stay (as vLLM and transformers): cutting some of equal logits
        would pick by the sort's arbitrary order, e.g. top_k=1 would always draw the same one of two tied tokens."""
        if not any(p.uses_top_p for p in params):
            return Sampler._apply_top_k(logits, params)
        B, V = logits.shape
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        ks = _to_device([min(p.top_k, V) if p.uses_top_k else V for p in params], torch.long, logits.device)
        kth = sorted_logits.gather(1, ks[:, None] - 1)  # [B, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if any(p.uses_top_p for p in params):
            ps = _to_device([p.top_p for p in params], torch.float32, logits.device)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [B, V]
            top_p_mask = mass_before >= ps[:, None]
            top_p_mask[:, 0] = False  # always keep the most likely token
            sorted_logits = sorted_logits.masked_fill(top_p_mask, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    @staticmethod
    def _apply_top_k(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Top-k without top-p: each row's k-th largest logit from one topk of the batch's largest k, not a sort of
        the whole vocabulary (Qwen3's recommended top_k=20 over 152k tokens). The same cut as _apply_top_k_top_p:
        ties with the k-th largest stay; rows without top-k keep every token."""
        V = logits.shape[1]
        ks = [min(p.top_k, V) if p.uses_top_k else 0 for p in params]
        top = logits.topk(max(ks), dim=-1).values  # [B, max k], largest first
        ks_dev = _to_device(ks, torch.long, logits.device)[:, None]  # [B, 1]
        kth = top.gather(1, (ks_dev - 1).clamp_(min=0))  # [B, 1]
        kth = kth.masked_fill(ks_dev == 0, float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
