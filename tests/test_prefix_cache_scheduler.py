"""The scheduler with prefix caching, driven like the engine drives it (optionally one step ahead of the read-back,
as asynchronous scheduling does) over shared-prefix workloads with preemption and aborts, against a simulated
paged cache. The cache checks what a real model relies on: every slot a step reads holds the K/V of exactly that
token *and everything before it* (so a shared block is right for every sharer), and no step writes a block that
is shared or cached. Reference counts and free blocks are recounted from the block tables after every step."""

import random
from collections import Counter

import pytest

from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus

BS = 4


class SimulatedCache:
    """Slots hold (position, the context up to and including that token). Placeholder tokens are fed from the
    'device' values the previous step sampled, as the engine feeds them."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[int, tuple[int, tuple]] = {}
        self.device: dict[tuple[str, int], int] = {}  # (request, index of a placeholder) -> sampled value

    def token(self, seq: Sequence, pos: int) -> int:
        token = seq.token_ids[pos]
        return self.device[(seq.request_id, pos)] if token == PENDING_TOKEN else token

    def run(self, out) -> dict[str, int]:
        sampled = {}
        for s in out.scheduled:
            seq = s.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            context = tuple(self.token(seq, p) for p in range(end))
            for pos in range(start, end):
                block = seq.block_table[pos // BS]
                assert self.bm.ref_count(block) == 1 and not self.bm.is_cached(block), \
                    f"{seq.request_id} writes block {block}, which is shared or cached"
                self.slots[self.bm.slot(seq, pos)] = (pos, context[: pos + 1])
            for pos in range(end):
                assert self.slots[self.bm.slot(seq, pos)] == (pos, context[: pos + 1]), (seq, pos)
            if s.samples:
                sampled[seq.request_id] = sum(context) * 31 % 97
        return sampled


def expected(seq: Sequence) -> list[int]:
    tokens = list(seq.prompt_token_ids)
    for _ in range(seq.params.max_tokens):
        tokens.append(sum(tokens) * 31 % 97)
    return tokens


def check_references(bm: BlockManager, sched: Scheduler) -> None:
    held = Counter(b for seq in sched.running for b in seq.block_table)
    for block in range(bm.first_block, bm.first_block + bm.num_blocks):
        assert bm.ref_count(block) == held[block], block
    assert bm.num_free_blocks == bm.num_blocks - len(held)
    assert all(not seq.block_table and seq.block_row == -1 for seq in sched.waiting)


def drive(sched: Scheduler, arrivals: dict[int, list[Sequence]], lag: int, aborts: dict[int, str] | None = None,
          max_steps: int = 20_000) -> None:
    """Each step: schedule, launch (the simulated model runs, then `advance`), read back the step `lag` steps
    behind (`resolve`), finish sequences at max_tokens, as LLMEngine.step does."""
    bm, cache, in_flight, aborts = sched.block_manager, SimulatedCache(sched.block_manager), [], aborts or {}
    for step in range(max_steps):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        if step in aborts:
            sched.abort(aborts[step])
        if not sched.has_unfinished() and not in_flight and step > max(arrivals):
            return
        out = sched.schedule()
        if not out.is_empty:
            sampled = cache.run(out)
            pending = sched.advance(out)
            for seq, index in pending:
                cache.device[(seq.request_id, index)] = sampled[seq.request_id]
                if index + 1 - seq.num_prompt_tokens >= seq.params.max_tokens:
                    seq.final_in_flight = True
            in_flight.append((pending, [sampled[seq.request_id] for seq, _ in pending]))
        while in_flight and (len(in_flight) > lag or out.is_empty):
            for seq, _ in sched.resolve(*in_flight.pop(0)):
                if seq.num_output_tokens >= seq.params.max_tokens and not seq.num_pending:
                    sched.finish(seq, "length")
        check_references(bm, sched)
    raise AssertionError("did not finish")


def shared_prefix_workload(rng: random.Random, n: int, prefix_len: int = 22):
    bases = [[rng.randrange(97) for _ in range(prefix_len)] for _ in range(3)]
    seqs, arrivals = [], {}
    for i in range(n):
        prompt = bases[i % 3][: rng.randint(1, prefix_len)] + [rng.randrange(97) for _ in range(rng.randint(0, 6))]
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 9), temperature=0.0), i)
        seqs.append(seq)
        arrivals.setdefault(rng.randint(0, 12), []).append(seq)
    return seqs, arrivals


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prefixes_with_preemption_and_aborts_keep_every_token_right(seed, lag):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=20, block_size=BS)  # tight: preemption and eviction both happen
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=12)
    seqs, arrivals = shared_prefix_workload(rng, 18)
    aborts = {rng.randint(2, 30): f"r{rng.randrange(18)}" for _ in range(3)}
    drive(sched, arrivals, lag, aborts)
    assert sched.num_preemptions_total > 0, "the workload did not preempt"
    assert sched.prefix_cache_hits_total > 0, "nothing was shared"
    for seq in seqs:
        if seq.finish_reason == "abort":
            known = [t for t in seq.token_ids if t != PENDING_TOKEN]
            assert known == expected(seq)[: len(known)], seq
        else:
            assert seq.finish_reason == "length" and seq.token_ids == expected(seq), seq
    assert bm.num_free_blocks == bm.num_blocks


def test_counters_are_exact_and_a_prefix_is_taken_at_admission():
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    first = Sequence("a", list(range(10)), SamplingParams(max_tokens=3, temperature=0.0), 0)
    drive(sched, {0: [first]}, lag=1)
    # a computed 12 of its 13 tokens (10 prompt + 2 fed outputs; the last sampled one never is): 3 full blocks
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (10, 0)
    assert bm.num_cached_blocks == 3
    again = Sequence("b", first.token_ids[:12] + [5], SamplingParams(max_tokens=1, temperature=0.0), 1)
    same = Sequence("c", list(range(8)), SamplingParams(max_tokens=1, temperature=0.0), 2)
    sched.add(again)
    sched.add(same)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("b", 1), ("c", 4)]
    assert again.num_cached_tokens == 12 and same.num_cached_tokens == 4, "a prompt's last token is computed"
    assert again.block_table[0] == same.block_table[0] and bm.ref_count(same.block_table[0]) == 2
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (10 + 13 + 8, 12 + 4)


def test_caching_off_counts_nothing_and_shares_nothing():
    bm = BlockManager(num_blocks=64, block_size=BS, prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [Sequence(f"r{i}", list(range(12)), SamplingParams(max_tokens=2, temperature=0.0), i) for i in range(3)]
    drive(sched, {0: seqs[:1], 5: seqs[1:]}, lag=1)
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (0, 0)
    assert all(seq.token_ids == expected(seq) and seq.num_cached_tokens == 0 for seq in seqs)


def test_a_preempted_sequence_is_recomputed_from_its_own_cached_blocks_and_not_counted_again():
    bm = BlockManager(num_blocks=8, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, watermark=0.0)
    old = Sequence("old", [1] * 14, SamplingParams(max_tokens=4, temperature=0.0), 0)
    new = Sequence("new", [2] * 13, SamplingParams(max_tokens=8, temperature=0.0), 1)
    cache = SimulatedCache(bm)
    sched.add(old)
    sched.add(new)
    preempted_at = None
    for step in range(40):
        out = sched.schedule()
        if out.preempted:
            assert out.preempted == [new] and new.status is SequenceStatus.WAITING
            preempted_at = step
        if preempted_at is not None and new.status is SequenceStatus.RUNNING:
            break
        sampled = cache.run(out)
        sched.update_after_step(out, [sampled[s.seq.request_id] for s in out.scheduled if s.samples])
        if old.status is SequenceStatus.RUNNING and old.num_output_tokens >= 4:
            sched.finish(old, "length")
    assert preempted_at is not None, "no preemption"
    [entry] = [s for s in out.scheduled if s.seq is new]
    assert new.num_computed_tokens == 12 and entry.num_new_tokens == new.num_tokens - 12, \
        "its three committed blocks survived in the evictable pool"
    assert sched.prefix_cache_queries_total == 14 + 13 and sched.prefix_cache_hits_total == 0
