"""KV-cache groups in the block manager (model/engine/block_manager.py, model/kv_groups.py): a sliding group's
blocks go back to the shared pool once no future query can see them; the pool is counted over all groups; prefix
hits need each group's blocks. Expected values come from the attention masks' definition (a query at position q
sees keys k with q - window < k <= q), worked out here independently of the manager's formula."""

import random

import pytest

from model.config import ModelConfig
from model.engine.block_manager import BlockManager, blocks_for
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence
from model.kv_groups import KvCacheGroups, blocks_in_window, max_sequence_tokens, null_block

FULL, SLIDING = 0, 1


def seq_of(tokens, index=0) -> Sequence:
    return Sequence(f"r{index}", list(tokens), SamplingParams(max_tokens=1000), index)


def manager(num_blocks=64, bs=4, windows=(None, 8), caching=False) -> BlockManager:
    return BlockManager(num_blocks, bs, first_block=len(windows), max_seqs=2, max_blocks_per_seq=2,
                        prefix_caching=caching, windows=windows)


def visible_to_next_query(block: int, num_computed: int, window: int, bs: int) -> bool:
    """Does any query at position >= num_computed see a key of `block`? The nearest one (q = num_computed) sees
    the most: keys k with q - window < k <= q."""
    return any(num_computed - window < k for k in range(block * bs, (block + 1) * bs))


def step(bm: BlockManager, seq: Sequence, chunk: int) -> None:
    """One launched step of `chunk` tokens: allocate, check it can read and write what it needs, advance."""
    c = seq.num_computed_tokens
    bm.allocate(seq, c + chunk)
    for g, window in enumerate(bm.windows):
        lowest = 0 if window is None else max(0, c - window + 1)  # the first new query's oldest visible key
        for pos in range(lowest, c + chunk):
            assert seq.block_tables[g][pos // bm.block_size] >= bm.first_block, (g, pos, seq.block_tables[g])
    seq.num_computed_tokens += chunk
    bm.commit(seq)
    bm.release_outside_window(seq)


def check_tables(bm: BlockManager, seq: Sequence) -> None:
    c, bs = seq.num_computed_tokens, bm.block_size
    for g, window in enumerate(bm.windows):
        table = seq.block_tables[g]
        assert len(table) == len(seq.block_table)
        for i, block in enumerate(table):
            keep = window is None or i * bs >= c or visible_to_next_query(i, c, window, bs)
            assert (block >= bm.first_block) == keep, (g, i, c, table)
            if not keep:
                assert block == null_block(g)
        row = bm.group_tables[g, seq.block_row, : len(table)].tolist()
        assert row == table


@pytest.mark.parametrize("window, bs", [(8, 4), (6, 4), (5, 4), (1, 4), (3, 1), (16, 16), (17, 16)])
def test_sliding_blocks_are_released_exactly_when_the_window_passes_them(window, bs):
    bm = manager(bs=bs, windows=(None, window), num_blocks=400)
    seq = seq_of(range(100))
    step(bm, seq, 1)
    check_tables(bm, seq)
    for _ in range(99):  # decode: one token at a time
        step(bm, seq, 1)
        check_tables(bm, seq)
        assert bm.num_held_blocks(seq, SLIDING) <= -(-window // bs) + 1  # ceil(window / bs) + 1 while decoding
    assert bm.num_held_blocks(seq, FULL) == blocks_for(100, bs)


@pytest.mark.parametrize("window, chunk", [(8, 4), (8, 7), (6, 9), (5, 13)])
def test_chunked_prefill_keeps_what_its_queries_read_and_releases_the_rest(window, chunk):
    bs = 4
    bm = manager(bs=bs, windows=(None, window), num_blocks=200)
    seq = seq_of(range(80))
    while seq.num_computed_tokens < 80:
        step(bm, seq, min(chunk, 80 - seq.num_computed_tokens))  # `step` checks the chunk's reads and writes
        check_tables(bm, seq)
        assert bm.num_held_blocks(seq, SLIDING) <= blocks_in_window(window, chunk, bs)


def test_pool_is_counted_over_all_groups_and_each_id_has_one_owner():
    bm = manager(num_blocks=40, windows=(None, 8))
    a, b = seq_of(range(30), 0), seq_of(range(30), 1)
    assert bm.blocks_needed(a, 9) == 2 * 3  # 3 blocks of tokens, in both groups
    assert bm.max_tokens_coverable(a) == 40 // 2 * 4
    step(bm, a, 9)
    step(bm, b, 9)
    for _ in range(12):
        step(bm, a, 1)
    held = [blk for s in (a, b) for table in s.block_tables for blk in table if blk >= bm.first_block]
    assert len(held) == len(set(held)), "a block id is in two tables"
    assert bm.num_free_blocks == 40 - len(held)
    # a: 21 tokens -> 6 full blocks; sliding keeps the blocks of positions >= 21 - 8 + 1 = 14: blocks 3..5
    assert bm.num_held_blocks(a, FULL) == 6 and bm.num_held_blocks(a, SLIDING) == 3
    bm.free(a)  # finish / abort / preemption all free through here
    bm.free(b)
    assert bm.num_free_blocks == 40 and a.block_tables == [] and b.block_row == -1


def test_null_block_ids_must_be_reserved():
    with pytest.raises(ValueError, match="reserved"):
        BlockManager(10, 4, first_block=1, windows=(None, 8))
    with pytest.raises(ValueError, match="reserved"):
        BlockManager(10, 4, first_block=0, windows=(8,))
    BlockManager(10, 4, first_block=0)  # one full group: nothing reserved, as before


def test_kv_groups_of_gpt_oss_and_mixtral_shapes():
    def config(**changes):
        return ModelConfig(model_type="t", name="t", vocab_size=8, hidden_size=8, num_layers=4, num_heads=2,
                           num_kv_heads=1, head_dim=4, max_position_embeddings=64, num_experts=2, top_k=1,
                           moe_intermediate_size=8, intermediate_size=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                           rope_theta=10000.0, **changes)

    oss = KvCacheGroups.of(config(sliding_window=128, layer_types=("sliding_attention", "full_attention") * 2))
    assert oss.windows == (None, 128) and oss.layer_group == (1, 0, 1, 0) and oss.layer_slot == (0, 0, 1, 1)
    assert oss.num_slots == 2
    mixtral = KvCacheGroups.of(config(sliding_window=8))
    assert mixtral.windows == (8,) and mixtral.layer_slot == (0, 1, 2, 3)
    plain = KvCacheGroups.of(config())
    assert plain.windows == (None,) and plain.layer_slot == (0, 1, 2, 3) and plain.num_slots == 4
    # the longest sequence that fits 20 blocks of 4: full group 20 - (sliding window blocks) blocks
    assert max_sequence_tokens(plain, 20, 4, chunk=1, limit=10**6) == 80
    assert max_sequence_tokens(oss, 20, 4, chunk=1, limit=10**6) == 40  # window 128 > 40 tokens: 10 blocks each
    small = KvCacheGroups((None, 8), (1, 0), (0, 0))
    assert max_sequence_tokens(small, 20, 4, chunk=1, limit=10**6) == (20 - 3) * 4  # sliding holds 3 (8/4 + 1)
    assert max_sequence_tokens(KvCacheGroups((8,), (0,), (0,)), 20, 4, chunk=1, limit=5000) == 5000


class ReferenceAllocator:
    """Counts only: each sequence holds blocks_for(allocated) blocks in a full group and, in a sliding group, those
    whose positions the next query can still see (by the mask, brute force)."""

    def __init__(self, num_blocks, bs, windows):
        self.num_blocks, self.bs, self.windows = num_blocks, bs, windows
        self.state = {}  # rid -> (allocated tokens, computed tokens)

    def held(self, rid) -> int:
        allocated, computed = self.state[rid]
        total = 0
        for window in self.windows:
            for i in range(blocks_for(allocated, self.bs)):
                total += window is None or i * self.bs >= computed or visible_to_next_query(i, computed, window,
                                                                                             self.bs)
        return total

    def free(self) -> int:
        return self.num_blocks - sum(self.held(rid) for rid in self.state)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("windows", [(None, 8), (None, 6, 13), (7,)])
def test_random_operations_match_a_reference_allocator(seed, windows):
    rng, bs, num_blocks = random.Random(seed), 4, 60
    bm, ref = manager(num_blocks, bs, windows), ReferenceAllocator(num_blocks, bs, windows)
    seqs, index = {}, 0
    for _ in range(300):
        op = rng.random()
        if op < 0.15 or not seqs:
            seq = seq_of(range(rng.randint(1, 60)), index)
            seqs[seq.request_id], ref.state[seq.request_id] = seq, (0, 0)
            index += 1
        elif op < 0.25:  # finish, abort or preempt: all free every group's blocks
            rid = rng.choice(sorted(seqs))
            bm.free(seqs.pop(rid))
            del ref.state[rid]
        else:
            rid = rng.choice(sorted(seqs))
            seq = seqs[rid]
            chunk = rng.choice([1, 1, 1, rng.randint(1, 12)])
            target = seq.num_computed_tokens + chunk
            if not bm.can_allocate(seq, target):
                with pytest.raises(RuntimeError, match="out of KV blocks"):
                    bm.allocate(seq, target)
                continue
            step(bm, seq, chunk)
            ref.state[rid] = (max(ref.state[rid][0], target), target)
            check_tables(bm, seq)
        assert bm.num_free_blocks == ref.free()
        held = [b for s in seqs.values() for t in s.block_tables for b in t if b >= bm.first_block]
        assert len(held) == len(set(held))


def computed_with_caching(bm: BlockManager, seq: Sequence) -> Sequence:
    """Admit `seq` as the scheduler does (take its cached prefix) and compute the rest of its prompt in one step."""
    hit = bm.cached_prefix(seq)
    bm.take_prefix(seq, hit)
    seq.num_computed_tokens = len(hit) * bm.block_size
    step(bm, seq, seq.num_tokens - seq.num_computed_tokens)
    return seq


def test_prefix_hit_is_shortened_to_what_the_sliding_group_still_has():
    bs, window = 4, 8
    bm = manager(num_blocks=14, bs=bs, windows=(None, window), caching=True)
    a = computed_with_caching(bm, seq_of(range(26), 0))  # 7 blocks per group = all 14
    # sliding blocks 0..3 were released at once (positions < 26 - 8 + 1 = 19), committed: evictable, oldest first
    assert a.block_tables[SLIDING][:4] == [null_block(SLIDING)] * 4
    bm.free(a)
    c = seq_of(range(1000, 1006), 1)  # 2 blocks per group: the 2 plain blocks, then evicts sliding blocks 0..3
    bm.allocate(c, 6)

    again = seq_of(range(26), 2)
    hit = bm.cached_prefix(again)  # needs full 0..5, and sliding blocks of positions >= 24 - 8 + 1: 4..5
    assert len(hit) == 6 and hit.tables[SLIDING][:4] == [null_block(SLIDING)] * 4
    assert all(b >= bm.first_block for b in hit.tables[SLIDING][4:] + hit.tables[FULL])
    shared = seq_of([*range(12), 500, 501, 502, 503, 504, 505, 506, 507], 3)
    # the full group alone has 3 blocks; the sliding group lacks blocks 1, 2 (for 3), 0, 1 (for 2), 0 (for 1)
    assert list(bm.cached_prefix(shared)) == [] and bm.cached_prefix(shared).tables == [[], []]

    bm.free(c)
    assert bm.num_reclaimed_by(hit) == 8
    bm.take_prefix(again, hit)
    assert again.window_starts[SLIDING] == 4 and again.num_committed_blocks == 6
    again.num_computed_tokens = 24
    step(bm, again, 2)
    check_tables(bm, again)


def test_mixtral_style_single_sliding_group_hits_without_the_early_blocks():
    bm = manager(num_blocks=12, bs=4, windows=(8,), caching=True)
    a = computed_with_caching(bm, seq_of(range(30), 0))
    bm.free(a)
    hit = bm.cached_prefix(seq_of(range(30), 1))  # 7 blocks, needs positions >= 28 - 7 = 21: blocks 5, 6
    assert len(hit) == 7 and hit[:5] == [null_block(0)] * 5 and min(hit[5:]) >= bm.first_block


def test_scheduler_bounds_sliding_blocks_and_releases_everything():
    bs, window = 4, 8
    bm = BlockManager(24, bs, first_block=2, windows=(None, window), prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=6, watermark=0.0)
    rng = random.Random(1)
    for i in range(4):
        sched.add(Sequence(f"s{i}", [rng.randrange(50) for _ in range(rng.randint(3, 20))],
                           SamplingParams(max_tokens=30, ignore_eos=True), i))
    steps = 0
    while sched.has_unfinished() and steps < 500:
        out = sched.schedule()
        for s in out.scheduled:
            held = bm.num_held_blocks(s.seq, SLIDING)
            assert held <= blocks_in_window(window, s.num_new_tokens, bs), (s.seq, held)
        sched.update_after_step(out, [7] * sum(s.samples for s in out.scheduled))
        for seq in list(sched.running):
            if seq.num_output_tokens >= 30:
                sched.finish(seq, "length")
        steps += 1
        if steps == 20:
            sched.abort("s3")
    assert not sched.has_unfinished() and sched.num_preemptions_total > 0, "the pool was meant to preempt"
    assert bm.num_free_blocks == bm.num_blocks


class ContentTracker:
    """What each block id holds: (group, the sequence's tokens up to the last position written into it). A step
    may only read blocks whose content is its own sequence's tokens (a stale or foreign block fails), and a cached
    prefix must hand out blocks holding exactly the new sequence's tokens in that group."""

    def __init__(self, bm: BlockManager):
        self.bm, self.content = bm, {}

    def check_reads(self, seq: Sequence, start: int, end: int) -> None:
        bs = self.bm.block_size
        for g, window in enumerate(self.bm.windows):
            lowest = 0 if window is None else max(0, start - window + 1)
            for pos in range(lowest, start):  # keys computed before this step
                group, tokens = self.content[seq.block_tables[g][pos // bs]]
                assert group == g and len(tokens) > pos and list(tokens) == seq.token_ids[: len(tokens)], (g, pos)

    def write(self, seq: Sequence, start: int, end: int) -> None:
        bs = self.bm.block_size
        for g, table in enumerate(seq.block_tables):
            for i in range(start // bs, blocks_for(end, bs)):
                self.content[table[i]] = (g, tuple(seq.token_ids[: min(end, (i + 1) * bs)]))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("windows", [(None, 8), (6,), (None, 5, 11)])
def test_random_traffic_with_prefix_caching_reads_only_its_own_tokens(seed, windows):
    rng, bs = random.Random(seed), 4
    bm = manager(num_blocks=48, bs=bs, windows=windows, caching=True)
    tracker, seqs, index, hits = ContentTracker(bm), {}, 0, 0
    heads = [[rng.randrange(5) for _ in range(rng.randint(4, 30))] for _ in range(3)]
    for _ in range(400):
        op = rng.random()
        if op < 0.2 or not seqs:
            seq = seq_of(rng.choice(heads) + [rng.randrange(5) for _ in range(rng.randint(1, 12))], index)
            index += 1
            hit = bm.cached_prefix(seq)
            tokens_needed = blocks_for(seq.num_tokens, bs) - len(hit)
            if bm.num_free_blocks - bm.num_reclaimed_by(hit) < tokens_needed * len(windows):
                continue
            for g, table in enumerate(hit.tables):  # every block handed out holds this sequence's tokens
                for i, block in enumerate(table):
                    if block >= bm.first_block:
                        assert tracker.content[block] == (g, tuple(seq.token_ids[: (i + 1) * bs]))
            hits += len(hit)
            bm.take_prefix(seq, hit)
            seq.num_computed_tokens = len(hit) * bs
            seqs[seq.request_id] = seq
        elif op < 0.3:
            bm.free(seqs.pop(rng.choice(sorted(seqs))))
        else:
            seq = seqs[rng.choice(sorted(seqs))]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(rng.randrange(5))  # decoding: a new token to compute
            start = seq.num_computed_tokens
            end = min(seq.num_tokens, start + rng.choice([1, 3, 9]))
            if not bm.can_allocate(seq, end):
                continue
            bm.allocate(seq, end)
            tracker.check_reads(seq, start, end)
            tracker.write(seq, start, end)
            seq.num_computed_tokens = end
            bm.commit(seq)
            bm.release_outside_window(seq)
        refs = {}
        for s in seqs.values():
            for table in s.block_tables:
                for block in table:
                    if block >= bm.first_block:
                        refs[block] = refs.get(block, 0) + 1
        assert all(bm.ref_count(b) == n for b, n in refs.items())
        assert bm.num_free_blocks == bm.num_blocks - len(refs)
    assert hits > 0, "no prefix was ever shared"
