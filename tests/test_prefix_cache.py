"""Automatic prefix caching in the block manager (no model): the hash chain, sharing by reference count, eviction
order, reset, and a randomized model-based test against a plain reference allocator (hypothesis)."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from model.engine.block_manager import BlockManager, blocks_for
from model.engine.prefix_hash import block_hash, extend_block_hashes, root_hash
from model.engine.sampling_params import SamplingParams
from model.engine.sequence import PENDING_TOKEN, Sequence

BS = 4


def seq_of(tokens, i=0) -> Sequence:
    return Sequence(f"s{i}", list(tokens), SamplingParams(max_tokens=4, temperature=0.0), arrival_index=i)


def computed(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> Sequence:
    """Allocate and mark `num_tokens` (default all) tokens computed, then commit: a launched prefill."""
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    bm.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    bm.commit(seq)
    return seq


def admit(bm: BlockManager, seq: Sequence) -> int:
    """What the scheduler does on admission: take the cached prefix, allocate the rest. Returns cached tokens."""
    cached = bm.cached_prefix(seq)
    bm.take_prefix(seq, cached)
    seq.num_computed_tokens = len(cached) * bm.block_size
    bm.allocate(seq, seq.num_tokens)
    return seq.num_computed_tokens


# ---- hash chain ---------------------------------------------------------------------------------------------------
def test_hash_chain_names_a_block_and_everything_before_it():
    a = seq_of(range(10))
    extend_block_hashes(a, b"m", BS, 99)
    assert len(a.block_hashes) == 2, "only full blocks are hashed"
    assert a.block_hashes[0] == block_hash(root_hash(b"m"), [0, 1, 2, 3])
    assert a.block_hashes[1] == block_hash(a.block_hashes[0], [4, 5, 6, 7])
    b = seq_of([9, 1, 2, 3, 4, 5, 6, 7])  # differs only in token 0
    extend_block_hashes(b, b"m", BS, 99)
    assert all(x != y for x, y in zip(a.block_hashes, b.block_hashes)), "an early change changes every later hash"
    c = seq_of([4, 5, 6, 7, 0, 1, 2, 3])  # the same blocks in the other order
    extend_block_hashes(c, b"m", BS, 99)
    assert not set(c.block_hashes) & set(a.block_hashes)
    other_model, salted = seq_of(range(8)), seq_of(range(8))
    salted.cache_salt = b"adapter-1"
    extend_block_hashes(other_model, b"m2", BS, 99)
    extend_block_hashes(salted, b"m", BS, 99)
    assert not {*other_model.block_hashes, *salted.block_hashes} & set(a.block_hashes)
    assert root_hash(b"ab", b"c") != root_hash(b"a", b"bc"), "keys are length-prefixed"
    short = seq_of(range(10))
    extend_block_hashes(short, b"m", BS, 1)
    assert short.block_hashes == a.block_hashes[:1], "hashes only as many blocks as asked"


def test_hashing_stops_at_a_token_still_in_flight():
    seq = seq_of([*range(7), PENDING_TOKEN, 8, 9])
    extend_block_hashes(seq, b"", BS, 99)
    assert len(seq.block_hashes) == 1
    seq.token_ids[7] = 7
    extend_block_hashes(seq, b"", BS, 99)
    assert len(seq.block_hashes) == 2


# ---- sharing, references, eviction --------------------------------------------------------------------------------
def test_shared_prefix_is_taken_by_reference_and_never_covers_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = computed(bm, seq_of(range(14), 0))  # 3 full blocks + 2 tokens
    a_blocks = list(a.block_table)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 12
    b = seq_of([*range(8), 50, 51, 52, 53, 54], 1)
    assert admit(bm, b) == 8 and b.block_table[:2] == a_blocks[:2]
    assert [bm.ref_count(x) for x in a_blocks] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 16 - 4 - 2, "b's own blocks: 50..53 and 54"
    assert not set(b.block_table[2:]) & set(a_blocks)
    assert len(bm.cached_prefix(seq_of(range(12), 2))) == 2, "a prompt of exactly 3 cached blocks computes the 3rd"
    assert bm.cached_prefix(seq_of(range(13), 3)) == a_blocks[:3]
    assert bm.cached_prefix(seq_of([1, *range(1, 14)], 4)) == [], "a different first token shares nothing"
    bm.free(a)
    assert [bm.ref_count(x) for x in a_blocks] == [1, 1, 0, 0]
    assert bm.num_free_blocks == 16 - 4, "a's own blocks are free, the shared ones still held by b"
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.usage == 0.0, "cached blocks nobody holds count as free"
    assert bm.cached_prefix(seq_of(range(13), 5)) == a_blocks[:3], "and stay cached"


def test_partial_blocks_and_blocks_being_computed_are_never_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = computed(bm, seq_of(range(11)), 6)  # first chunk: block 0 full, block 1 half computed
    assert bm.num_cached_blocks == 1 and bm.is_cached(a.block_table[0]) and not bm.is_cached(a.block_table[1])
    assert len(bm.cached_prefix(seq_of(range(11), 1))) == 1
    a.num_computed_tokens = 11
    bm.commit(a)
    assert bm.num_cached_blocks == 2, "tokens 8..10 are a partial block"


def test_the_same_block_computed_twice_stays_private():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = seq_of(range(9), 0), seq_of(range(9), 1)
    bm.allocate(a, 9)
    bm.allocate(b, 9)  # admitted in one step: nothing was committed yet, both compute the prefix
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.commit(s)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    assert bm.num_cached_blocks == 2 and not any(bm.is_cached(x) for x in b_blocks)
    bm.free(b)
    bm.free(a)
    assert bm.cached_prefix(seq_of(range(9), 3)) == a_blocks[:2]


def test_eviction_takes_plain_blocks_first_then_the_least_recently_freed_tail_first():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = computed(bm, seq_of(range(8), 0))  # blocks 0, 1 committed
    b = computed(bm, seq_of(range(100, 108), 1))  # blocks 2, 3 committed
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    c = seq_of(range(200, 211), 2)  # 3 blocks: the two plain ones, then one eviction
    bm.allocate(c, 11)
    assert c.block_table == [4, 5, a_blocks[1]], "plain blocks first, then a's tail (freed first)"
    assert len(bm.cached_prefix(seq_of(range(9), 3))) == 1, "a's first block survives"
    assert len(bm.cached_prefix(seq_of(range(100, 109), 4))) == 2
    d = seq_of(range(300, 305), 5)
    bm.allocate(d, 5)
    assert d.block_table == [a_blocks[0], b_blocks[1]], "then a's head, then b's tail: freeing order"
    assert bm.cached_prefix(seq_of(range(9), 6)) == [] and bm.num_cached_blocks == 1


def test_a_hit_refreshes_the_block_in_the_eviction_order():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = computed(bm, seq_of(range(8), 0))
    c = computed(bm, seq_of(range(50, 58), 1))
    a_blocks, c_blocks = list(a.block_table), list(c.block_table)
    bm.free(a)
    bm.free(c)  # eviction order: a1, a0, c1, c0
    probe = seq_of([0, 1, 2, 3, 77, 78], 2)
    hit = bm.cached_prefix(probe)
    assert hit == a_blocks[:1] and bm.num_reclaimed_by(hit) == 1
    admit(bm, probe)  # takes a0 back, evicts a1 for its own second block
    assert probe.block_table == [a_blocks[0], a_blocks[1]] and bm.num_free_blocks == 2
    bm.free(probe)  # its tail is plain now; a0 goes to the young end
    e = seq_of(range(90, 101), 3)
    bm.allocate(e, 11)
    assert e.block_table == [a_blocks[1], c_blocks[1], c_blocks[0]]
    assert bm.cached_prefix(seq_of(range(5), 4)) == a_blocks[:1], "the block hit last is evicted last"


def test_reset_forgets_cached_blocks_but_not_blocks_in_use():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = computed(bm, seq_of(range(9), 0))
    b = computed(bm, seq_of(range(50, 58), 1))
    bm.free(b)
    assert bm.reset_prefix_cache() == 4 and bm.num_cached_blocks == 0
    assert bm.cached_prefix(seq_of(range(9), 2)) == [] and bm.num_free_blocks == 8 - 3
    assert [bm.ref_count(x) for x in a.block_table] == [1, 1, 1], "a keeps its blocks"
    a.token_ids += [9, 10, 11, 12]
    bm.allocate(a, 13)
    a.num_computed_tokens = 13
    bm.commit(a)
    assert bm.num_cached_blocks == 0, "a's new blocks attend to its pre-reset K/V: never cached"
    bm.free(a)
    assert bm.num_free_blocks == 8
    c = computed(bm, seq_of(range(9), 3))  # admitted after the reset: caches as usual
    assert bm.num_cached_blocks == 2 and bm.cached_prefix(seq_of(range(9), 4)) == c.block_table[:2]


def test_caching_off_shares_nothing_and_misuse_is_caught():
    bm = BlockManager(num_blocks=8, block_size=BS, prefix_caching=False)
    a = computed(bm, seq_of(range(9), 0))
    assert bm.num_cached_blocks == 0 and bm.cached_prefix(seq_of(range(9), 1)) == []
    with pytest.raises(RuntimeError, match="already holds"):
        bm.take_prefix(a, [])
    saved = list(a.block_table)
    bm.free(a)
    a.block_tables = [saved]
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(a)
    assert bm.num_free_blocks == 8, "a refused free changes nothing"


# ---- randomized model-based test ----------------------------------------------------------------------------------
class ReferenceAllocator:
    """The same policy written the plain way: a block's cache key is the tuple of every token up to its end (no
    hashing), pools are lists, and holders are counted by scanning the sequences."""

    def __init__(self, num_blocks: int):
        self.plain = list(range(num_blocks))
        self.evictable: list[int] = []  # oldest first
        self.content: dict[int, tuple] = {}  # committed block -> its key
        self.tables: dict[str, list[int]] = {}
        self.committed: dict[str, int] = {}
        self.stale: set[str] = set()  # holding blocks at a reset: they commit nothing until freed

    def key(self, tokens, i):
        return tuple(tokens[: (i + 1) * BS])

    def holders(self, block):
        return sum(table.count(block) for table in self.tables.values())

    def take_free(self):
        if self.plain:
            return self.plain.pop(0)
        block = self.evictable.pop(0)
        del self.content[block]
        return block

    def prefix(self, tokens):
        by_key = {k: b for b, k in self.content.items()}
        found = []
        for i in range((len(tokens) - 1) // BS):
            if self.key(tokens, i) not in by_key:
                break
            found.append(by_key[self.key(tokens, i)])
        return found

    def admit(self, rid, tokens):
        hit = self.prefix(tokens)
        for block in hit:
            if block in self.evictable:
                self.evictable.remove(block)
        self.tables[rid] = hit + [self.take_free() for _ in range(blocks_for(len(tokens), BS) - len(hit))]
        self.committed[rid] = len(hit)
        return len(hit) * BS

    def grow(self, rid, num_tokens):
        while len(self.tables[rid]) < blocks_for(num_tokens, BS):
            self.tables[rid].append(self.take_free())

    def commit(self, rid, tokens, num_computed):
        if rid in self.stale:
            return
        full = min(num_computed // BS, len(self.tables[rid]))
        keys = set(self.content.values())
        for i in range(self.committed[rid], full):
            block = self.tables[rid][i]
            if self.key(tokens, i) not in keys and block not in self.content:
                self.content[block] = self.key(tokens, i)
                keys.add(self.key(tokens, i))
        self.committed[rid] = max(self.committed[rid], full)

    def free(self, rid):
        table = self.tables.pop(rid)
        del self.committed[rid]
        self.stale.discard(rid)
        for block in reversed(table):
            if self.holders(block) == 0:
                (self.evictable if block in self.content else self.plain).append(block)

    def reset(self):
        self.plain += self.evictable
        self.evictable = []
        self.content = {}
        self.stale = set(self.tables)


NUM_BLOCKS = 12
BASES = [[7] * 40, list(range(40)), [3, 1, 4, 1, 5, 9, 2, 6] * 5]  # shared prefixes


class PrefixCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.ref = ReferenceAllocator(NUM_BLOCKS)
        self.seqs: dict[str, Sequence] = {}
        self.count = 0

    @rule(base=st.integers(0, len(BASES) - 1), keep=st.integers(0, 24), tail=st.lists(st.integers(0, 3), max_size=6))
    def admit(self, base, keep, tail):
        tokens = BASES[base][:keep] + tail
        if not tokens:
            return
        seq = seq_of(tokens, self.count)
        hit = self.bm.cached_prefix(seq)
        assert hit == self.ref.prefix(tokens)
        for i, block in enumerate(hit):  # a hit is what the reference says that block holds
            assert self.ref.content[block] == tuple(tokens[: (i + 1) * BS])
        needed = blocks_for(len(tokens), BS) - len(hit)
        if needed > self.bm.num_free_blocks - self.bm.num_reclaimed_by(hit):
            return
        assert admit(self.bm, seq) == self.ref.admit(seq.request_id, tokens)
        self.seqs[seq.request_id] = seq
        self.count += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data):
        """A launched chunk: some of the uncomputed tokens become computed and full blocks are committed."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        seq.num_computed_tokens += data.draw(st.integers(0, seq.num_tokens - seq.num_computed_tokens))
        self.bm.commit(seq)
        self.ref.commit(seq.request_id, seq.token_ids, seq.num_computed_tokens)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), token=st.integers(0, 3))
    def decode(self, data, token):
        """A fully computed sequence samples a token, which needs a block every BS tokens."""
        done = sorted(r for r, s in self.seqs.items() if s.num_computed_tokens == s.num_tokens)
        if not done:
            return
        seq = self.seqs[data.draw(st.sampled_from(done))]
        if self.bm.blocks_needed(seq, seq.num_tokens + 1) > self.bm.num_free_blocks:
            return
        seq.token_ids.append(token)
        self.bm.allocate(seq, seq.num_tokens)
        self.ref.grow(seq.request_id, seq.num_tokens)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release(self, data):
        """Finish, abort or preemption: all the same to the block manager."""
        rid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(self.seqs.pop(rid))
        self.ref.free(rid)

    @rule()
    def reset(self):
        assert self.bm.reset_prefix_cache() == len(self.ref.content)
        self.ref.reset()

    @invariant()
    def same_state_as_the_reference(self):
        assert {r: s.block_table for r, s in self.seqs.items()} == self.ref.tables
        for block in range(NUM_BLOCKS):
            assert self.bm.ref_count(block) == self.ref.holders(block)
            assert self.bm.is_cached(block) == (block in self.ref.content)
        assert self.bm.num_free_blocks == len(self.ref.plain) + len(self.ref.evictable)
        assert self.bm.num_cached_blocks == len(self.ref.content)

    @invariant()
    def nobody_writes_a_shared_or_cached_block(self):
        for seq in self.seqs.values():
            for block in seq.block_table[seq.num_computed_tokens // BS:]:  # blocks it will still write
                assert self.bm.ref_count(block) == 1 and not self.bm.is_cached(block)

    @invariant()
    def tables_mirror(self):
        for seq in self.seqs.values():
            row = self.bm.tables[seq.block_row].tolist()
            assert row[: len(seq.block_table)] == seq.block_table and not any(row[len(seq.block_table):])


PrefixCacheMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
test_block_manager_matches_the_reference_allocator = PrefixCacheMachine.TestCase
