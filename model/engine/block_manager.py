"""Paged KV cache bookkeeping: a free list of fixed-size blocks and each sequence's block table.

Each sequence holding blocks also owns a row of `tables`, a host int32 array that mirrors its block table (zero
past its end), written only when blocks are added or freed. A decode step's block tables are then one gather of
rows, not a Python list rebuilt for every sequence at every step.
"""

from collections import deque

import numpy as np

from model.engine.sequence import Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, first_block: int = 0, max_seqs: int = 8,
                 max_blocks_per_seq: int = 8):
        """Manages block ids first_block .. first_block + num_blocks - 1 (lower ids are reserved by the caller).
        `max_seqs` x `max_blocks_per_seq` is the initial size of `tables` (it grows if more are needed)."""
        if num_blocks < 1 or block_size < 1 or first_block < 0:
            raise ValueError(f"need num_blocks >= 1, block_size >= 1, first_block >= 0; got "
                             f"{num_blocks}, {block_size}, {first_block}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.first_block = first_block
        self._free: deque[int] = deque(range(first_block, first_block + num_blocks))
        self._in_use = [False] * (first_block + num_blocks)
        self.tables = np.zeros((max(1, max_seqs), max(1, max_blocks_per_seq)), dtype=np.int32)  # [rows, blocks]
        self._free_rows = list(range(self.tables.shape[0] - 1, -1, -1))  # pop() takes the lowest row

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its table covers `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(seq.block_table))

    def max_tokens_coverable(self, seq: Sequence, reserve: int = 0) -> int:
        """Tokens `seq` could hold if it took every free block except `reserve`."""
        return (len(seq.block_table) + max(0, len(self._free) - reserve)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free) - reserve

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover `num_tokens` tokens."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: {seq.request_id} needs {needed}, {len(self._free)} free")
        if needed == 0:
            return
        blocks = [self._free.popleft() for _ in range(needed)]
        for block in blocks:
            self._in_use[block] = True
        start = len(seq.block_table)
        seq.block_table += blocks
        if seq.block_row < 0:
            seq.block_row = self._take_row()
        if len(seq.block_table) > self.tables.shape[1]:
            self._grow(self.tables.shape[0], max(len(seq.block_table), 2 * self.tables.shape[1]))
        self.tables[seq.block_row, start : len(seq.block_table)] = blocks

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            if not self._in_use[block]:
                raise RuntimeError(f"double free of KV block {block} by {seq.request_id}")
            self._in_use[block] = False
            self._free.append(block)
        if seq.block_row >= 0:
            self.tables[seq.block_row, : len(seq.block_table)] = 0
            self._free_rows.append(seq.block_row)
            seq.block_row = -1
        seq.block_table = []

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
