"""KV-cache groups: layers with the same attention kind share one block table per sequence, and storage slots let
one pool of block ids serve every group.

A sliding-window layer never reads a key more than `window - 1` positions behind its query, so its blocks behind
the window can go back to the pool (model/engine/block_manager.py) while the full-attention layers keep theirs.
That needs a block table per kind of layer: a *group* is the layers of one attention kind (the full layers; the
layers of one window size), and each sequence holds one table per group. Block ids come from one shared pool; an id
belongs to one group at a time.

Storage: the cache tensor is [num_slots, *one layer's cache]. The j-th layer of each group uses slot j, through its
own group's block table: gpt-oss-20b (12 sliding + 12 full layers) has 12 slots, each read by one full and one
sliding layer. Since an id belongs to one group at a time, two layers sharing a slot never touch the same block.
With unequal groups, slots = the largest group's layer count: a block id then reserves that many layers' worth of
memory in every group, so a smaller group leaves (slots - its layers) layers of each of its blocks unused. (E.g. 8
sliding + 16 full layers: 16 slots, a sliding block wastes 8 layers of memory; still less than keeping every layer
for the whole sequence once sequences pass 2 windows.)

Reserved ids: block g (g < num_groups) is group g's padding block. Padding rows of a CUDA-graph batch and the table
entries of released blocks point at it; it only ever holds finite values (zeros, then the padding token's K/V), so
a masked-out read of it cannot make NaN, and the Triton kernels never load it at all (their key loops start at the
window). A model without sliding layers has one group, slot = layer index, and block 0 reserved: as before.
"""

import os
from dataclasses import dataclass

from model.config import ModelConfig

SLIDING_KV_MODES = ("free", "mask")


@dataclass(frozen=True)
class KvCacheGroups:
    windows: tuple[int | None, ...]  # per group; None = full attention (always group 0 when present)
    layer_group: tuple[int, ...]  # per layer: its group
    layer_slot: tuple[int, ...]  # per layer: its storage slot in the cache tensor

    @staticmethod
    def of(config: ModelConfig) -> "KvCacheGroups":
        """The groups of `config`'s layers. `STATICMOE_SLIDING_KV=mask` (default `free`) is the escape hatch to the
        layout before groups: one full group, every layer keeping its blocks, windows applied by the masks only."""
        mode = os.environ.get("STATICMOE_SLIDING_KV", "free")
        if mode not in SLIDING_KV_MODES:
            raise ValueError(f"STATICMOE_SLIDING_KV={mode!r}: want one of {', '.join(SLIDING_KV_MODES)}")
        if mode == "mask":
            return KvCacheGroups((None,), (0,) * config.num_layers, tuple(range(config.num_layers)))
        windows = [config.sliding_window_of(i) for i in range(config.num_layers)]
        kinds = sorted(set(windows), key=lambda w: -1 if w is None else w)  # full first, then by window
        layer_group, layer_slot, count = [], [], [0] * len(kinds)
        for window in windows:
            g = kinds.index(window)
            layer_group.append(g)
            layer_slot.append(count[g])
            count[g] += 1
        return KvCacheGroups(tuple(kinds), tuple(layer_group), tuple(layer_slot))

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_slots(self) -> int:
        return max(self.layer_slot) + 1

    @property
    def has_full_group(self) -> bool:
        return None in self.windows


def null_block(group: int) -> int:
    """Group `group`'s reserved padding block (see the module doc)."""
    return group


def blocks_in_window(window: int, chunk: int, block_size: int) -> int:
    """Most blocks a sliding group holds for one sequence that feeds `chunk` tokens per step: the keys a step's
    queries can see (window - 1 behind the first, up to the last new token) span at most this many blocks."""
    return (window - 1 + chunk + block_size - 1) // block_size + 1


def blocks_for_sequence(groups: KvCacheGroups, num_tokens: int, block_size: int, chunk: int) -> int:
    """Blocks of the pool one sequence of `num_tokens` tokens needs at most, over all groups, fed `chunk` tokens
    per step (a full group holds every block; a sliding group at most its window's)."""
    full = (num_tokens + block_size - 1) // block_size
    return sum(full if w is None else min(full, blocks_in_window(w, chunk, block_size)) for w in groups.windows)


def max_sequence_tokens(groups: KvCacheGroups, num_blocks: int, block_size: int, chunk: int, limit: int) -> int:
    """The longest sequence (at most `limit` tokens) whose blocks, over all groups, fit `num_blocks`: the whole
    cache's tokens with one full group, unbounded by length (up to `limit`) without one once the windows fit."""
    low, high = 0, limit  # blocks_for_sequence grows with the length: bisect for the last length that fits
    while low < high:
        mid = (low + high + 1) // 2
        if blocks_for_sequence(groups, mid, block_size, chunk) <= num_blocks:
            low = mid
        else:
            high = mid - 1
    return low
