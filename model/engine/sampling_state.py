"""The engine's per-sequence sampling state across steps, and the per-step `SamplingExtras` it derives from it.

- min_tokens: until a sequence has that many output tokens, its EOS (unless ignore_eos) and stop token ids are
  banned. The count is known on the host at launch (placeholders of tokens in flight count). EOS is not banned
  where the grammar's mask allows nothing else: a complete grammar ends the output whatever min_tokens says.
- bad_words: a one-token word is always banned; a longer one bans its last token after the output ends with the
  rest of it (vLLM's definition; the output tokens must be on the host: `needs_previous_tokens`).
- penalties: a row of model/engine/penalties.PenaltyState from the sequence's first sample to its end.
- grammar: an llguidance matcher per sequence, advanced by each sampled token; its bitmask for the next token is
  filled right before the sample.
"""

import logging

import torch

from model.engine.penalties import PenaltyState
from model.engine.sampler import SamplingExtras
from model.engine.sequence import Sequence
from model.engine.structured_output import GrammarMasks, allows_only, matcher_error

logger = logging.getLogger(__name__)


class SequenceSampling:
    def __init__(self, vocab_size: int, device: torch.device, max_num_seqs: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.penalties = PenaltyState(vocab_size, device, max_num_seqs)
        self.masks = GrammarMasks(vocab_size, pin=device.type == "cuda")
        self.eos_token_ids = list(eos_token_ids)

    def on_add(self, seq: Sequence) -> None:
        if seq.params.grammar is not None:
            seq.matcher = seq.params.grammar.new_matcher()

    def release(self, seq: Sequence) -> None:
        """The sequence is done (finished or aborted): its penalty row goes back to the pool."""
        self.penalties.release(seq.penalty_row)
        seq.penalty_row = -1

    def extras(self, seqs: list[Sequence]) -> SamplingExtras:
        """What the host decides for one sample of each of `seqs` (in batch-row order)."""
        extras = SamplingExtras()
        matchers = []
        eos_after_mask = []  # (row, index of its grammar mask): min_tokens bans EOS unless the grammar is complete
        for row, seq in enumerate(seqs):
            p = seq.params
            if not p.has_row_state or seq.is_finished:  # finished: by a token read back after this step's launch
                continue
            num_outputs = seq.num_tokens - seq.num_prompt_tokens
            if num_outputs < p.min_tokens:
                # stop_token_ids past the vocabulary are accepted (never sampled, so nothing to ban): banning one
                # would index past the logits (an IndexError here, a device-side assert on the GPU)
                extras.banned += [(row, t) for t in p.stop_token_ids if t < self.vocab_size]
                if not p.ignore_eos:
                    if seq.matcher is not None:  # decided once its mask is known
                        eos_after_mask.append((row, len(matchers)))
                    else:
                        extras.banned += [(row, t) for t in self.eos_token_ids if t < self.vocab_size]
            for word in p.bad_words_token_ids:
                if len(word) == 1 or (num_outputs >= len(word) - 1 and
                                      seq.token_ids[seq.num_tokens - len(word) + 1:] == word[:-1]):
                    extras.banned.append((row, word[-1]))
            if p.uses_penalties:
                if seq.penalty_row < 0:
                    outputs = [t for t in seq.token_ids[seq.num_prompt_tokens:] if t >= 0]
                    seq.penalty_row = self.penalties.acquire(seq.prompt_token_ids, outputs)
                if extras.penalty_rows is None:
                    extras.penalty_rows = [-1] * len(seqs)
                extras.penalty_rows[row] = seq.penalty_row
            if seq.matcher is not None:
                extras.grammar_rows.append(row)
                matchers.append(seq.matcher)
        if matchers:
            extras.grammar_bitmask = self.masks.fill(matchers)
        eos = [t for t in self.eos_token_ids if t < self.vocab_size]
        for row, index in eos_after_mask:
            # A complete grammar admits EOS alone (docs: it ends the output even before min_tokens): a grammar done
            # after a text token is stopped by advance_grammars, but one whose only output is empty (regex "") is
            # complete before any token, and banning its EOS left the row nothing to sample (no_allowed_token)
            if not allows_only(extras.grammar_bitmask[index], eos):
                extras.banned += [(row, t) for t in eos]
        return extras

    def advance_grammars(self, sampled: list[tuple[Sequence, int]]) -> set[Sequence]:
        """Advance each constrained sequence's grammar by its sampled token; the sequences whose grammar is done:
        complete (nothing but EOS may follow), or broken (the token was rejected or the grammar engine hit its
        limits: `seq.error` says so, and the token is not part of the output). A plain loop: consume_token takes
        3-5 us a token, and llguidance's batched LLExecutor.consume_token_par was slower for 64 sequences
        (0.5-0.7 ms against 0.2-0.3 ms on the 2-core CPU machine)."""
        done = set()
        for seq, token in sampled:
            matcher = seq.matcher
            if matcher is not None and (not matcher.consume_token(token) or matcher.is_stopped()):
                if matcher.is_error():
                    self._rejected(seq, token)
                done.add(seq)
        return done

    @staticmethod
    def _rejected(seq: Sequence, token: int) -> None:
        reason = matcher_error(seq.matcher)
        logger.warning("request %s: token %d rejected by its grammar (%s); ending it with an error", seq.request_id,
                       token, reason)
        seq.error = ("structured_output_failed", f"The structured output could not continue: {reason}")
