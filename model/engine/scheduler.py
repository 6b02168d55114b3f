"""Continuous batching: which sequences run in the next step, and how many new tokens each feeds.

Policy, each step:
1. Decodes first: every running sequence that needs one token, oldest first. If it needs a new KV block and none is
   free, the newest unscheduled running sequence is preempted (by recompute) until one is — or, when the requester
   is itself the newest, the requester is preempted.
2. Running sequences still prefilling get a chunk of the remaining token budget (chunked prefill).
3. Waiting sequences (preempted ones first, then by arrival) are admitted while the budget, `max_num_seqs` and the
   free blocks (minus a small watermark that keeps room for decodes) allow; their prompt may be cut into chunks.
   Nothing is admitted in a step that preempted. With `prefill_hold_steps` (default 0: off), a step of decodes
   admits nobody while the prompts the free slots could take make less than one step's token budget and the
   oldest has waited fewer steps than that: on the GPU every step that prefills runs eagerly, host-bound at about
   twice a decode graph replay, so prompts arriving one or two a step (outputs of varied lengths: structured
   output) would make nearly every step eager; held, they prefill together in one (benchmarks/NOTES.md, session
   13). A step that prefills anyway (a chunk in progress) admits them at once. With prefix caching, an admitted
   sequence first takes the cached blocks of its longest cached prefix (model/engine/block_manager.py) and its
   first chunk starts after them.
A sequence samples a token only in the step whose chunk reaches its last token. Once a step is launched, the full
blocks it completed are committed to the prefix cache (in `advance`, or in `resolve` when the block's last token
was still in flight), and the blocks of sliding-window groups that no later query can see are released (`advance`).
Block counts (needed, free) are over all KV-cache groups: a step of a model with a full and a sliding group takes
two blocks per new block of tokens, and the sliding one comes back once the window has passed it.
"""

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from model.engine.block_manager import BlockManager
from model.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus


def _arrival(seq: Sequence) -> int:
    return seq.arrival_index


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, starting at seq.num_computed_tokens
    samples: bool  # the chunk reaches the sequence's last token, so a token is sampled


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)  # append through add()
    preempted: list[Sequence] = field(default_factory=list)
    num_tokens: int = 0  # new tokens of the step
    num_non_decode: int = 0  # scheduled entries that are not one sampled token

    def add(self, entry: ScheduledSequence) -> None:
        self.scheduled.append(entry)
        self.num_tokens += entry.num_new_tokens
        if entry.num_new_tokens != 1 or not entry.samples:
            self.num_non_decode += 1

    @property
    def is_decode(self) -> bool:
        return bool(self.scheduled) and self.num_non_decode == 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, prefill_hold_steps: int = 0):
        self.block_manager = block_manager
        self.prefill_hold_steps = prefill_hold_steps
        self.num_steps = 0  # schedule() calls: the clock of prefill_hold_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()  # ordered by arrival_index
        self.running: list[Sequence] = []  # ordered by arrival_index
        self.num_preemptions_total = 0
        # vLLM's prefix-cache counters, in tokens, over first admissions (a preempted sequence re-admitted is not
        # a new query): tokens looked up, and tokens found cached. A prompt_logprobs request is not looked up (its
        # cached positions would give no logits), so it is not counted, as in vLLM
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0

    # ---- membership -------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.waiting_since = self.num_steps
        self._insert_waiting(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the sequence wherever it is and free its blocks. Returns it, or None if unknown/finished."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a running or waiting sequence out for good, freeing its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _insert_waiting(self, seq: Sequence) -> None:
        self.waiting.insert(bisect.bisect(self.waiting, seq.arrival_index, key=_arrival), seq)

    # ---- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.num_steps += 1
        out = SchedulerOutput()
        scheduled_ids: set[int] = set()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. decodes, oldest first (`running` is kept in arrival order; iterate a copy: preemption edits it)
        # This loop runs for every sequence at every decode step, so `is_decoding` and `blocks_needed` are inlined.
        running, block_size = list(self.running), bm.block_size
        for seq in running:
            if budget == 0:
                break
            num_tokens = len(seq.token_ids)
            if (seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != num_tokens - 1
                    or seq.final_in_flight):
                continue
            if num_tokens > len(seq.block_table) * block_size:  # a new block, once per block_size tokens
                if not self._make_room(seq, bm.blocks_needed(seq, num_tokens), scheduled_ids, out):
                    continue  # the requester itself was preempted
                bm.allocate(seq, num_tokens)
            out.add(ScheduledSequence(seq, 1, True))
            scheduled_ids.add(id(seq))
            budget -= 1

        # 2. running sequences in the middle of their prefill (none left when every running one was scheduled)
        for seq in running if len(out.scheduled) < len(self.running) else ():
            if budget == 0:
                break
            if id(seq) in scheduled_ids or seq.status != SequenceStatus.RUNNING or seq.final_in_flight:
                continue
            chunk = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + chunk
            if not self._make_room(seq, bm.blocks_needed(seq, target), scheduled_ids, out, preempt_self=False):
                chunk = min(chunk, bm.max_tokens_coverable(seq) - seq.num_computed_tokens)
                if chunk <= 0:
                    continue
            budget -= self._schedule_chunk(seq, chunk, out, scheduled_ids)

        # 3. admit waiting sequences (not in a step that had to preempt: blocks are short, admitting would thrash)
        admit = not out.preempted and not self._holds_prompts(out)
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while its last token was in flight: its prompt is not known in full yet
            cached = bm.cached_prefix(seq)  # empty without prefix caching
            num_cached = len(cached) * bm.block_size
            # the watermark keeps room for the running sequences' growth; with none running it would only keep a
            # prompt that fits from ever being admitted (its cached prefix takes the rest), and the queue behind it
            watermark = self.watermark_blocks if self.running else 0
            free = bm.num_free_blocks - bm.num_reclaimed_by(cached) - watermark
            chunk = min(seq.num_tokens - num_cached, budget, bm.tokens_for_free_blocks(free))
            if chunk <= 0:
                break
            self.waiting.popleft()
            if cached:
                bm.take_prefix(seq, cached)
                seq.num_computed_tokens = num_cached
            if bm.prefix_caching and seq.num_preemptions == 0 and seq.params.prompt_logprobs is None:
                seq.num_cached_tokens = num_cached
                self.prefix_cache_queries_total += seq.num_tokens
                self.prefix_cache_hits_total += num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_arrival)
            budget -= self._schedule_chunk(seq, chunk, out, scheduled_ids)
        return out

    def _holds_prompts(self, out: SchedulerOutput) -> bool:
        """Whether this step of decodes leaves the waiting prompts waiting (`prefill_hold_steps`, module doc)."""
        if not self.prefill_hold_steps or not self.waiting or not out.is_decode:
            return False  # off; nobody waits; nothing decodes or the step prefills anyway
        head = self.waiting[0]
        if head.num_preemptions or self.num_steps - head.waiting_since >= self.prefill_hold_steps:
            return False  # a preempted sequence is not held; the oldest prompt has waited long enough
        # held while those that the free slots could take now make less than one step's budget of tokens (not
        # "while they fill fewer slots than are free": at concurrency = max_num_seqs each arrival fills the slot its
        # predecessor freed, and nothing would ever be held)
        admissible = itertools.islice(self.waiting, max(0, self.max_num_seqs - len(self.running)))
        return sum(seq.num_tokens for seq in admissible) < self.max_num_batched_tokens

    def _schedule_chunk(self, seq: Sequence, chunk: int, out: SchedulerOutput, scheduled_ids: set[int]) -> int:
        target = seq.num_computed_tokens + chunk
        self.block_manager.allocate(seq, target)
        out.add(ScheduledSequence(seq, chunk, target == seq.num_tokens))
        scheduled_ids.add(id(seq))
        return chunk

    def _make_room(self, seq: Sequence, blocks: int, scheduled_ids: set[int], out: SchedulerOutput,
                   preempt_self: bool = True) -> bool:
        """Preempt newer, unscheduled running sequences until `blocks` are free. False if that is not enough
        (then `seq` itself is preempted when `preempt_self`)."""
        bm = self.block_manager
        while bm.num_free_blocks < blocks:
            candidates = [s for s in self.running if id(s) not in scheduled_ids and s is not seq
                          and s.arrival_index > seq.arrival_index]
            if not candidates:
                if preempt_self:
                    self._preempt(seq, out)
                return False
            self._preempt(max(candidates, key=lambda s: s.arrival_index), out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self._insert_waiting(seq)
        out.preempted.append(seq)
        self.num_preemptions_total += 1

    def advance(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Once the step is launched: count its tokens as computed and append a PENDING_TOKEN placeholder to each
        sequence that samples. Returns (sequence, index of its placeholder) in the order of the sampled rows."""
        pending = []
        bm, block_size, caching = self.block_manager, self.block_manager.block_size, self.block_manager.prefix_caching
        windowed = bm.num_groups > 1 or bm.windows[0] is not None
        for s in out.scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            if caching and seq.num_computed_tokens >= (seq.num_committed_blocks + 1) * block_size:  # block completed
                bm.commit(seq)
            if windowed:  # after the commit, so that committed blocks stay cached (evictable) once released
                bm.release_outside_window(seq)
            if s.samples:
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending += 1
                pending.append((seq, len(seq.token_ids) - 1))
        return pending

    def resolve(self, pending: list[tuple[Sequence, int]], sampled: list[int]) -> list[tuple[Sequence, int]]:
        """Write the sampled ids over the placeholders of `advance`. Sequences finished meanwhile (a stop found
        in an earlier token, an abort) drop theirs. Returns the (sequence, index) pairs that got a token."""
        got = []
        bm, block_size, caching = self.block_manager, self.block_manager.block_size, self.block_manager.prefix_caching
        for (seq, index), token in zip(pending, sampled, strict=True):
            seq.num_pending -= 1
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.token_ids[index] = token
            got.append((seq, index))
            if caching and seq.num_computed_tokens >= (seq.num_committed_blocks + 1) * block_size:  # was in flight
                bm.commit(seq)
        return got

    def update_after_step(self, out: SchedulerOutput, sampled: list[int]) -> list[Sequence]:
        """`advance` and `resolve` at once (a step whose sampled ids are already on the host). Returns the
        sequences that got a token."""
        return [seq for seq, _ in self.resolve(self.advance(out), sampled)]
