"""Randomized model-based test of the scheduler + block manager with prefix caching: random arrivals over shared
prefixes, aborts at any time (waiting, mid-prefill, mid-decode, with a step in flight), early stops found at
read-back (as the engine finds EOS one step late), `reset_prefix_cache` while requests run, tight KV pools that
preempt, one or several KV-cache groups (sliding windows), and reads one step behind (asynchronous scheduling).

After every step the invariants are recounted from the sequences' tables, never taken from the manager's own
counters: each block's reference count is the number of (running sequence, group) entries holding it; a block is
either held or in exactly one free pool; free + held = total; an evictable block is cached and a plain one is not;
waiting and finished sequences hold nothing. A simulated paged cache checks that every key a step reads (within
the group's window) holds the K/V of exactly that sequence's context, so a shared, evicted or reused block with
the wrong content fails. Each sequence's output must equal the output it gets alone (the simulated model is a
deterministic function of the context)."""

import random
from collections import Counter

import pytest

from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from model.kv_groups import KvCacheGroups, max_sequence_tokens

STOP = 0  # a sampled value of STOP ends the sequence (as EOS would), found when the value is read back
VOCAB = 23


def next_token(context) -> int:
    return (sum(context) * 31 + len(context)) % VOCAB


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] == STOP:
            break
    return tokens[len(prompt):]


class SimulatedCache:
    """Slots hold (group, position, context up to that token); a read checks its window of keys in every group."""

    def __init__(self, bm: BlockManager):
        self.bm, self.slots, self.device = bm, {}, {}

    def token(self, seq: Sequence, pos: int) -> int:
        token = seq.token_ids[pos]
        return self.device[(seq.request_id, pos)] if token == PENDING_TOKEN else token

    def run(self, out) -> dict[str, int]:
        bm, bs, sampled = self.bm, self.bm.block_size, {}
        for s in out.scheduled:
            seq = s.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_new_tokens
            assert end <= len(seq.block_table) * bs, "chunk past the block table"
            context = tuple(self.token(seq, p) for p in range(end))
            for g in range(bm.num_groups):
                for pos in range(start, end):
                    block = seq.block_tables[g][pos // bs]
                    assert block >= bm.first_block, (seq, g, pos, "writes a null block")
                    assert bm.ref_count(block) == 1 and not bm.is_cached(block), \
                        f"{seq.request_id} writes block {block} (group {g}), which is shared or cached"
                    self.slots[(block, pos % bs)] = (g, pos, context[: pos + 1])
            for g, window in enumerate(bm.windows):
                for q in range(start, end):
                    lowest = 0 if window is None else max(0, q - window + 1)
                    for pos in range(lowest, q + 1):
                        block = seq.block_tables[g][pos // bs]
                        assert self.slots.get((block, pos % bs)) == (g, pos, context[: pos + 1]), \
                            (seq.request_id, g, q, pos, block)
            if s.samples:
                sampled[seq.request_id] = next_token(context)
        return sampled


def check_invariants(bm: BlockManager, sched: Scheduler, finished: list[Sequence]) -> None:
    held = Counter(b for seq in sched.running for table in seq.block_tables for b in table if b >= bm.first_block)
    total = range(bm.first_block, bm.first_block + bm.num_blocks)
    plain, evictable = list(bm._plain), list(bm._evictable)
    assert len(set(plain)) == len(plain) and not set(plain) & set(evictable), "a block in a free pool twice"
    assert not (set(plain) | set(evictable)) & set(held), "a block both free and held"
    assert set(plain) | set(evictable) | set(held) == set(total), "a block lost"
    for block in total:
        assert bm.ref_count(block) == held[block], (block, bm.ref_count(block), held[block])
    assert bm.num_free_blocks + len(held) == bm.num_blocks
    assert all(bm.is_cached(b) for b in evictable) and not any(bm.is_cached(b) for b in plain)
    assert all(bm._hash[b] == key for key, b in bm._cached.items()), "cache map and block keys disagree"
    for seq in list(sched.waiting) + finished:
        assert not seq.block_tables and seq.block_row == -1, seq
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        for g in range(bm.num_groups):
            assert bm.group_tables[g, seq.block_row, : len(seq.block_table)].tolist() == seq.block_tables[g]
    rows = [seq.block_row for seq in sched.running]
    assert len(set(rows)) == len(rows), "two sequences share a row of the tables"


def simulate(seed: int, windows, lag: int, num_blocks: int, bs: int = 4, n: int = 24, caching: bool = True):
    rng = random.Random(seed)
    first = len(windows) if windows != (None,) else 1
    bm = BlockManager(num_blocks, bs, first_block=first, windows=windows, prefix_caching=caching, max_seqs=2,
                      max_blocks_per_seq=2)
    sched = Scheduler(bm, max_num_seqs=rng.choice([1, 2, 4, 6]),
                      max_num_batched_tokens=rng.choice([1, 3, 5, 8, 13, 32]), watermark=rng.choice([0.0, 0.05, 0.3]),
                      prefill_hold_steps=rng.choice([0, 0, 2]))
    cache = SimulatedCache(bm)
    heads = [[rng.randrange(1, VOCAB) for _ in range(rng.choice([4, 8, 11, 16]))] for _ in range(3)]
    seqs, arrivals = [], {}
    for i in range(n):
        head = rng.choice(heads)
        prompt = head[: rng.choice([len(head), rng.randint(1, len(head))])]
        prompt = prompt + [rng.randrange(1, VOCAB) for _ in range(rng.choice([0, 0, 1, 3, 4, 7]))]
        prompt_logprobs = 1 if rng.random() < 0.15 else None
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.0,
                                                       prompt_logprobs=prompt_logprobs), i)
        seqs.append(seq)
        arrivals.setdefault(rng.randint(0, 30), []).append(seq)
        if rng.random() < 0.2:  # n > 1: the same prompt again, same step
            twin = Sequence(f"r{i}b", list(prompt), SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.0),
                            i)
            seqs.append(twin)
            arrivals[max(k for k, v in arrivals.items() if seq in v)].append(twin)
    for k in arrivals:  # arrival order = arrival_index order
        arrivals[k].sort(key=lambda s: s.arrival_index)
    index = {s.request_id: k for k, s in enumerate(sorted(seqs, key=lambda s: (s.arrival_index, s.request_id)))}
    for s in seqs:
        s.arrival_index = index[s.request_id]
    aborts = {rng.randint(1, 60): rng.choice(seqs).request_id for _ in range(4)}
    resets = {rng.randint(1, 60) for _ in range(3)}
    in_flight, finished = [], []

    def finish(seq, reason):
        if not seq.is_finished:
            sched.finish(seq, reason)
            finished.append(seq)

    for step in range(5000):
        for seq in sorted(arrivals.get(step, []), key=lambda s: s.arrival_index):
            sched.add(seq)
        if step in aborts:
            seq = sched.abort(aborts[step])
            if seq is not None:
                finished.append(seq)
        if step in resets:
            bm.reset_prefix_cache()
        if not sched.has_unfinished() and not in_flight and step > max(arrivals):
            break
        out = sched.schedule()
        if not out.is_empty:
            for s in out.scheduled:  # as LLMEngine._forward: prompt positions whose logits this step gives
                seq = s.seq
                if seq.params.prompt_logprobs is not None:
                    low = max(seq.num_computed_tokens, seq.prompt_logprob_positions)
                    high = min(seq.num_computed_tokens + s.num_new_tokens, seq.num_prompt_tokens - 1)
                    assert low >= seq.prompt_logprob_positions
                    if high > low:
                        assert seq.num_computed_tokens <= seq.prompt_logprob_positions, "positions skipped"
                        seq.prompt_logprob_positions = high
            sampled = cache.run(out)
            pending = sched.advance(out)
            for seq, i in pending:
                cache.device[(seq.request_id, i)] = sampled[seq.request_id]
                if i + 1 - seq.num_prompt_tokens >= seq.params.max_tokens:
                    seq.final_in_flight = True
            in_flight.append((pending, [sampled[seq.request_id] for seq, _ in pending]))
        while in_flight and (len(in_flight) > lag or out.is_empty):
            for seq, i in sched.resolve(*in_flight.pop(0)):
                if seq.token_ids[i] == STOP or i + 1 - seq.num_prompt_tokens >= seq.params.max_tokens:
                    del seq.token_ids[i + 1:]  # a placeholder sampled past the end
                    finish(seq, "stop" if seq.token_ids[i] == STOP else "length")
        check_invariants(bm, sched, finished)
    else:
        raise AssertionError("did not finish")
    for seq in seqs:
        want = reference_output(seq.prompt_token_ids, seq.params.max_tokens)
        got = [t for t in seq.output_token_ids if t != PENDING_TOKEN]
        if seq.finish_reason == "abort":
            assert got == want[: len(got)], seq
        else:
            assert got == want, (seq, seq.finish_reason)
    assert bm.num_free_blocks == bm.num_blocks
    # the counters: every admitted request without prompt_logprobs once (a preempted one is not counted again)
    looked_up = [s for s in seqs if s.status is not SequenceStatus.WAITING and s.params.prompt_logprobs is None
                 and (s.num_computed_tokens or s.num_preemptions or s.finish_reason != "abort")]
    if caching:
        assert sched.prefix_cache_queries_total == sum(s.num_prompt_tokens for s in looked_up)
        assert sched.prefix_cache_hits_total == sum(s.num_cached_tokens for s in looked_up)
        assert all(s.num_cached_tokens % bs == 0 and s.num_cached_tokens < s.num_prompt_tokens for s in seqs)
    else:
        assert sched.prefix_cache_queries_total == sched.prefix_cache_hits_total == 0
    return sched, bm


WINDOWS = [(None,), (None, 6), (None, 9), (7,), (None, 5, 10)]


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("windows", WINDOWS)
@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_keeps_every_invariant_and_every_output(seed, windows, lag):
    num_blocks = random.Random(seed).choice([9, 10, 12, 16, 40]) * len(windows)
    simulate(seed, windows, lag, num_blocks, caching=seed % 4 != 3)


@pytest.mark.parametrize("windows", WINDOWS)
def test_the_smallest_pool_that_holds_the_longest_sequence_still_runs_everything(windows):
    """As many blocks as the engine's max_model_len rule needs for the longest sequence (33 tokens), no more."""
    groups = KvCacheGroups(windows, (0,), (0,))
    num_blocks = next(n for n in range(1, 100) if max_sequence_tokens(groups, n, 4, 1, 1000) >= 33)
    preemptions = 0
    for seed in range(6):
        for lag in (0, 1):
            sched, _ = simulate(seed, windows, lag, num_blocks)
            preemptions += sched.num_preemptions_total
    assert preemptions > 0, "the pool was meant to preempt"
