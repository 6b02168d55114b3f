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
"""

from collections import OrderedDict, deque

import numpy as np

from model.engine.prefix_hash import extend_block_hashes
from model.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0, max_seqs: int = 8,
                 max_blocks_per_seq: int = 8, prefix_caching: bool = True, model_key: bytes = b""):
        """Manages block ids first_block .. first_block + num_blocks - 1 (lower ids are reserved by the caller).
        `max_seqs` x `max_blocks_per_seq` is the initial size of `tables` (it grows if more are needed).
        `model_key` names what computed the K/V (the model, its dtype): it roots every block hash."""
        if num_blocks < 1 or block_size < 1 or first_block < 0:
            raise ValueError(f"need num_blocks >= 1, block_size >= 1, first_block >= 0; got "
                             f"{num_blocks}, {block_size}, {first_block}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block = first_block
        self.prefix_caching = prefix_caching
        self.model_key = model_key
        end = first_block + num_blocks
        self._ref = [0] * end  # sequences holding each block
        self._hash: list[bytes | None] = [None] * end  # the hash a committed block is cached under
        self._cached: dict[bytes, int] = {}  # hash -> committed block
        self._plain: deque[int] = deque(range(first_block, end))  # free, nothing to reuse
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free and committed, least recently freed first
        self.tables = np.zeros((max(1, max_seqs), max(1, max_blocks_per_seq)), dtype=np.int32)  # [rows, blocks]
        self._free_rows = list(range(self.tables.shape[0] - 1, -1, -1))  # pop() takes the lowest row

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

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def max_tokens_coverable(self, seq: Sequence, reserve: int = 0) -> int:
        """Tokens `seq` could hold if it took every free block except `reserve`."""
        return (len(seq.block_table) + max(0, self.num_free_blocks - reserve)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks - reserve

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table with fresh blocks to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: {seq.request_id} needs {needed}, {self.num_free_blocks} free")
        if needed:
            self._append(seq, [self._take_free() for _ in range(needed)])

    def free(self, seq: Sequence) -> None:
        """Drop seq's references. Its last blocks are freed first, so they are evicted before its first ones: a
        shared prefix outlives the tails that only this sequence had."""
        table = seq.block_table
        if any(self._ref[block] < 1 for block in table):
            raise RuntimeError(f"double free of KV blocks by {seq.request_id}: "
                               f"{[b for b in table if self._ref[b] < 1]}")
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._plain.append(block)
                else:
                    self._evictable[block] = None
        if seq.block_row >= 0:
            self.tables[seq.block_row, : len(table)] = 0
            self._free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_table = []
        seq.num_committed_blocks = 0

    # ---- prefix cache ---------------------------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Committed blocks holding seq's leading full blocks, longest match first; never its last token."""
        if not self.prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        if seq.params.prompt_logprobs is not None:  # cached positions yield no logits: skip only those already given
            limit = min(limit, seq.prompt_logprob_positions // self.block_size)
        extend_block_hashes(seq, self.model_key, self.block_size, limit)
        blocks = []
        for h in seq.block_hashes[:limit]:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_reclaimed_by(self, blocks: list[int]) -> int:
        """How many free blocks taking `blocks` would use up (those no sequence holds yet)."""
        return sum(1 for block in blocks if self._ref[block] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Share `blocks` (from cached_prefix) as the start of seq's empty block table."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks; a cached prefix starts an empty table")
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        if blocks:
            self._append(seq, list(blocks))
        seq.num_committed_blocks = len(blocks)

    def commit(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks of known tokens to the cache. A block whose hash is cached already
        (another sequence computed the same tokens meanwhile) stays private and is freed as plain."""
        if not self.prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_committed_blocks:
            return
        extend_block_hashes(seq, self.model_key, self.block_size, num_full)
        num_full = min(num_full, len(seq.block_hashes))
        for i in range(seq.num_committed_blocks, num_full):
            h, block = seq.block_hashes[i], seq.block_table[i]
            if h not in self._cached and self._hash[block] is None:
                self._cached[h] = block
                self._hash[block] = h
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def reset_prefix_cache(self) -> int:
        """Forget every cached block (blocks in use stay with their sequences). Returns how many were cached."""
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

    def _append(self, seq: Sequence, blocks: list[int]) -> None:
        start = len(seq.block_table)
        seq.block_table += blocks
        if seq.block_row < 0:
            seq.block_row = self._take_row()
        if len(seq.block_table) > self.tables.shape[1]:
            self._grow(self.tables.shape[0], max(len(seq.block_table), 2 * self.tables.shape[1]))
        self.tables[seq.block_row, start : len(seq.block_table)] = blocks

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self.tables.shape[0]
            self._grow(2 * rows, self.tables.shape[1])
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int, cols: int) -> None:
        grown = np.zeros((rows, cols), dtype=np.int32)
        grown[: self.tables.shape[0], : self.tables.shape[1]] = self.tables
        self.tables = grown

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV slot of the token at `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
