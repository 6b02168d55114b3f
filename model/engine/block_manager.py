"""Paged KV cache bookkeeping: reference-counted blocks, each sequence's block table, and the prefix cache.

Each sequence holding blocks also owns a row of `tables`, a host int32 array that mirrors its block table (zero
past its end), written only when blocks are added or freed. A decode step's block tables are then one gather of
rows, not a Python list rebuilt for every sequence at every step.

Automatic prefix caching (as vLLM's): a full block whose tokens are all computed is *committed*: its chained hash
(model/engine/prefix_hash.py) maps to it in `_cached`. A new prompt's chain is walked through that map, and the
blocks found are shared by reference count instead of being prefilled again. Blocks nobody references go to one
of two free pools: `_plain` (no reusable content) and `_evictable` (committed, in least-recently-freed order).
Allocation takes plain blocks first and evicts the oldest committed one only when none is left, so cached
prefixes live as long as memory allows. Safety rests on three rules:
- only full blocks whose tokens were all computed by a launched step are committed, so a reader of a shared block
  is always enqueued after its writer on the stream, and the sequence that wrote it never writes it again;
- a sequence that takes a cached prefix starts computing at the block boundary after it, in blocks of its own;
- a cached prefix never covers a prompt's last token, which must be computed to give logits.

KV-cache groups (model/kv_groups.py): each sequence holds one table per group (full-attention layers; the layers
of one sliding window), all of the same length (entry i covers positions [i * block_size, (i + 1) * block_size)),
their block ids taken from the one pool. Once a sequence has computed `c` tokens, no later query (position >= c)
sees a key below c - window + 1 (masks: decode `key >= len - window`, prefill `key > query - window`), so a
sliding group's block i is *released* when (i + 1) * block_size <= c - window + 1: its reference is dropped and its
entry points at the group's null block. Release runs after a step is launched (`release_outside_window`, from the
scheduler's `advance`): that step may still read the block on the device, but any later writer of the id is a
later step on the same stream. The scheduler counts blocks over all groups (`blocks_needed`).

Prefix caching with sliding groups: a block is committed in every group under that group's key (the chained hash,
plus the group index for groups > 0), and released sliding blocks that were committed go to `_evictable` like any
other. A hit of n blocks (n * block_size tokens) needs, in each full group, all n blocks, and in each sliding group
only the blocks holding positions >= n * block_size - window + 1 (what the first computed query sees). The hit is
the longest n for which every group has what it needs (possibly 0); the sliding tables take only those blocks.
"""

from collections import OrderedDict, deque

import numpy as np

from model.engine.prefix_hash import extend_block_hashes
from model.engine.sequence import Sequence
from model.kv_groups import null_block


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def first_visible_block(num_computed: int, window: int, block_size: int) -> int:
    """Index of the first block a query at position >= num_computed can see through a window of `window`."""
    return max(0, num_computed - window + 1) // block_size


class PrefixHit(list):
    """A cached prefix: as a list, group 0's table entries; `tables` holds every group's (same length; a sliding
    group's entries before its window are null blocks)."""

    def __init__(self, tables: list[list[int]]):
        super().__init__(tables[0])
        self.tables = tables


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0, max_seqs: int = 8,
                 max_blocks_per_seq: int = 8, prefix_caching: bool = True, model_key: bytes = b"",
                 windows: tuple[int | None, ...] = (None,)):
        """Manages block ids first_block .. first_block + num_blocks - 1 (lower ids are reserved by the caller).
        `max_seqs` x `max_blocks_per_seq` is the initial size of `tables` (it grows if more are needed).
        `model_key` names what computed the K/V (the model, its dtype): it roots every block hash.
        `windows`: the KV-cache groups' windows (model/kv_groups.py; None = full attention). Ids below
        len(windows) must be reserved: they are the groups' null blocks."""
        if num_blocks < 1 or block_size < 1 or first_block < 0:
            raise ValueError(f"need num_blocks >= 1, block_size >= 1, first_block >= 0; got "
                             f"{num_blocks}, {block_size}, {first_block}")
        if not windows or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"windows must be a non-empty tuple of None or positive ints, got {windows!r}")
        if windows != (None,) and first_block < len(windows):
            raise ValueError(f"first_block={first_block}: ids 0..{len(windows) - 1} must be reserved for the "
                             f"null blocks of {len(windows)} KV-cache groups")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block = first_block
        self.prefix_caching = prefix_caching
        self.model_key = model_key
        self.windows = tuple(windows)
        self.num_groups = len(windows)
        self._sliding = [(g, w) for g, w in enumerate(windows) if w is not None]
        end = first_block + num_blocks
        self._ref = [0] * end  # sequences holding each block
        self._hash: list[bytes | None] = [None] * end  # the key a committed block is cached under
        self._cached: dict[bytes, int] = {}  # key -> committed block
        self._plain: deque[int] = deque(range(first_block, end))  # free, nothing to reuse
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free and committed, least recently freed first
        self._generation = 0  # reset_prefix_cache calls so far (Sequence.cache_generation)
        rows, cols = max(1, max_seqs), max(1, max_blocks_per_seq)
        self.group_tables = np.zeros((self.num_groups, rows, cols), dtype=np.int32)  # [groups, rows, blocks]
        self._free_rows = list(range(rows - 1, -1, -1))  # pop() takes the lowest row

    @property
    def tables(self) -> np.ndarray:
        """Group 0's host block tables [rows, blocks] (the only group of a model without sliding layers)."""
        return self.group_tables[0]

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, committed ones included (they are evicted on demand)."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_cached(self, block: int) -> bool:
        return self._hash[block] is not None

    def num_held_blocks(self, seq: Sequence, group: int = 0) -> int:
        """Real blocks (not null entries) of seq's table in `group`."""
        return sum(1 for block in seq.block_tables[group] if block >= self.first_block) if seq.block_tables else 0

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks (all groups together) `seq` needs so that its tables cover `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table)) * self.num_groups

    def tokens_for_free_blocks(self, free: int) -> int:
        """New tokens that `free` free blocks cover, from a block boundary (each block of tokens costs one block
        per group)."""
        return max(0, free) // self.num_groups * self.block_size

    def max_tokens_coverable(self, seq: Sequence, reserve: int = 0) -> int:
        """Tokens `seq` could hold if it took every free block except `reserve`."""
        return len(seq.block_table) * self.block_size + self.tokens_for_free_blocks(self.num_free_blocks - reserve)

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks - reserve

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's tables with fresh blocks to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: {seq.request_id} needs {needed}, {self.num_free_blocks} free")
        if needed:
            per_group = needed // self.num_groups
            self._append(seq, [[self._take_free() for _ in range(per_group)] for _ in range(self.num_groups)])

    def release_outside_window(self, seq: Sequence) -> None:
        """Release the sliding groups' blocks that no query at or after seq.num_computed_tokens can see (call
        once the step that computed them is launched; see the module doc)."""
        if not self._sliding or not seq.block_tables:
            return
        for g, window in self._sliding:
            table = seq.block_tables[g]
            start = seq.window_starts[g]
            end = min(len(table), first_visible_block(seq.num_computed_tokens, window, self.block_size))
            if end <= start:
                continue
            null = null_block(g)
            for i in range(start, end):
                self._drop(table[i])
                table[i] = null
            self.group_tables[g, seq.block_row, start:end] = null
            seq.window_starts[g] = end

    def free(self, seq: Sequence) -> None:
        """Drop seq's references in every group. Its last blocks are freed first, so they are evicted before its
        first ones: a shared prefix outlives the tails that only this sequence had."""
        tables = seq.block_tables
        held = [b for table in tables for b in table if b >= self.first_block]
        if any(self._ref[block] < 1 for block in held):
            raise RuntimeError(f"double free of KV blocks by {seq.request_id}: "
                               f"{[b for b in held if self._ref[b] < 1]}")
        for i in range(len(seq.block_table) - 1, -1, -1):
            for table in tables:
                self._drop(table[i])
        if seq.block_row >= 0:
            self.group_tables[:, seq.block_row, : len(seq.block_table)] = 0
            self._free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_tables = []
        seq.window_starts = []
        seq.num_committed_blocks = 0

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def _key(self, h: bytes, group: int) -> bytes:
        return h if group == 0 else h + bytes([group])

    def cached_prefix(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix of seq's leading full blocks every group can use (module doc); never its
        last token."""
        if not self.prefix_caching:
            return PrefixHit([[] for _ in range(self.num_groups)])
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.params.prompt_logprobs is not None:  # cached positions yield no logits: skip only those already given
            limit = min(limit, seq.prompt_logprob_positions // self.block_size)
        extend_block_hashes(seq, self.model_key, self.block_size, limit)
        hashes = seq.block_hashes[:limit]
        found: list[list[int | None]] = [[] for _ in range(self.num_groups)]  # per group: cached block per hash
        n = len(hashes)
        for g, window in enumerate(self.windows):
            if window is None:  # a full group needs every block: the hit ends at its first miss
                for h in hashes[:n]:
                    block = self._cached.get(self._key(h, g))
                    if block is None:
                        break
                    found[g].append(block)
                n = len(found[g])
        if self._sliding and n:
            # a hit of m blocks is usable by a sliding group when blocks [first visible, m) are all cached, i.e. when
            # the run of cached blocks ending at block m - 1 covers them: one vectorised pass over every m <= n
            m = np.arange(1, n + 1)  # [n] candidate hit lengths
            usable = np.ones(n, dtype=bool)
            for g, window in self._sliding:
                found[g] = [self._cached.get(self._key(h, g)) for h in hashes[:n]]
                cached = np.fromiter((b is not None for b in found[g]), dtype=bool, count=n)
                breaks = np.where(cached, -1, np.arange(n))  # [n] index of each miss, -1 elsewhere
                runs = np.arange(n) - np.maximum.accumulate(breaks)  # cached blocks in a row ending at each block
                first = np.maximum(0, m * self.block_size - window + 1) // self.block_size  # first_visible_block
                usable &= runs >= m - first
            usable_lengths = np.flatnonzero(usable)
            n = int(usable_lengths[-1]) + 1 if len(usable_lengths) else 0
        tables = []
        for g, window in enumerate(self.windows):
            first = 0 if window is None else first_visible_block(n * self.block_size, window, self.block_size)
            tables.append([null_block(g)] * first + found[g][first:n])
        return PrefixHit(tables)

    def _hit_tables(self, hit: list[int]) -> list[list[int]]:
        tables = getattr(hit, "tables", None)
        if tables is not None:
            return tables
        if self.num_groups > 1 and hit:
            raise ValueError("a prefix of several KV-cache groups must be a PrefixHit from cached_prefix")
        return [list(hit)] + [[] for _ in range(self.num_groups - 1)]

    def num_reclaimed_by(self, hit: list[int]) -> int:
        """How many free blocks taking `hit` would use up (those no sequence holds yet)."""
        return sum(1 for table in self._hit_tables(hit) for b in table if b >= self.first_block and self._ref[b] == 0)

    def take_prefix(self, seq: Sequence, hit: list[int]) -> None:
        """Share the blocks of `hit` (from cached_prefix) as the start of seq's empty tables."""
        if seq.block_tables and seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks; a cached prefix starts an empty table")
        tables = self._hit_tables(hit)
        for table in tables:
            for block in table:
                if block < self.first_block:
                    continue
                if self._ref[block] == 0:
                    del self._evictable[block]
                self._ref[block] += 1
        if tables[0]:
            self._append(seq, [list(t) for t in tables])
            for g, window in self._sliding:
                seq.window_starts[g] = first_visible_block(len(tables[0]) * self.block_size, window,
                                                           self.block_size)
        seq.num_committed_blocks = len(tables[0])

    def commit(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks of known tokens to the cache, in every group (released entries are
        skipped). A block whose key is cached already (another sequence computed the same tokens meanwhile) stays
        private and is freed as plain."""
        if not self.prefix_caching or seq.cache_generation != self._generation:
            return  # a sequence holding blocks from before a reset attends to pre-reset K/V: its blocks stay private
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_committed_blocks:
            return
        extend_block_hashes(seq, self.model_key, self.block_size, num_full)
        num_full = min(num_full, len(seq.block_hashes))
        for g, table in enumerate(seq.block_tables):
            for i in range(seq.num_committed_blocks, num_full):
                key, block = self._key(seq.block_hashes[i], g), table[i]
                if block >= self.first_block and key not in self._cached and self._hash[block] is None:
                    self._cached[key] = block
                    self._hash[block] = key
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block. Blocks in use stay with their sequences, but what those sequences compute
        from now on is never cached: it attends to K/V from before the reset (stale after a weight change); once
        freed or preempted, a sequence starts afresh and caches again. Returns how many blocks were cached."""
        self._generation += 1
        dropped = len(self._cached)
        for block in self._cached.values():
            self._hash[block] = None
        self._cached.clear()
        self._plain.extend(self._evictable)
        self._evictable.clear()
        return dropped

    # ---- internals ------------------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._plain:
            block = self._plain.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)  # evict the least recently freed committed block
            del self._cached[self._hash[block]]
            self._hash[block] = None
        self._ref[block] = 1
        return block

    def _drop(self, block: int) -> None:
        """One reference less on `block` (a null entry is none); at zero it goes to a free pool."""
        if block < self.first_block:
            return
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if self._hash[block] is None:
                self._plain.append(block)
            else:
                self._evictable[block] = None

    def _append(self, seq: Sequence, blocks: list[list[int]]) -> None:
        """Extend each group's table by its list of `blocks` (all the same length)."""
        if not seq.block_tables:
            seq.block_tables = [[] for _ in range(self.num_groups)]
            seq.window_starts = [0] * self.num_groups
            seq.cache_generation = self._generation
        start = len(seq.block_table)
        end = start + len(blocks[0])
        if seq.block_row < 0:
            seq.block_row = self._take_row()
        if end > self.group_tables.shape[2]:
            self._grow(self.group_tables.shape[1], max(end, 2 * self.group_tables.shape[2]))
        for g, new in enumerate(blocks):
            seq.block_tables[g] += new
            self.group_tables[g, seq.block_row, start:end] = new

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self.group_tables.shape[1]
            self._grow(2 * rows, self.group_tables.shape[2])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int, cols: int) -> None:
        grown = np.zeros((self.num_groups, rows, cols), dtype=np.int32)
        _, old_rows, old_cols = self.group_tables.shape
        grown[:, :old_rows, :old_cols] = self.group_tables
        self.group_tables = grown

    def slot(self, seq: Sequence, position: int, group: int = 0) -> int:
        """Flat KV slot of the token at `position` of `seq` in `group`'s storage."""
        return seq.block_tables[group][position // self.block_size] * self.block_size + position % self.block_size
