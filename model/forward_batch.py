"""`ForwardBatch`: everything one model step needs, built by the engine's scheduler.

All sequences' new tokens are concatenated into one flat row dimension N; B sequences; S rows whose logits are
wanted. The KV cache is paged: a sequence's token at position p lives in slot
`block_tables[b, p // block_size] * block_size + p % block_size`.
A model with sliding-window layers has several KV-cache groups (model/kv_groups.py), each with its own block tables
and so its own slots: `block_tables` / `slot_mapping` are group 0's, `group_block_tables` / `group_slot_mappings`
those of groups 1.. (empty for a single group); `of_group(g)` is the batch as group g's layers see it.
"""

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64, new tokens of all sequences concatenated
    positions: torch.Tensor  # [N] int64
    slot_mapping: torch.Tensor  # [N] int64, flat KV slot per new token; -1 = don't write (padding)
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0)
    context_lens: torch.Tensor  # [B] int32, tokens in the cache after this step (cached + new)
    query_start_loc: torch.Tensor  # [B+1] int32, prefix sums of new tokens per sequence
    logits_indices: torch.Tensor  # [S] int64, rows of the hidden states whose logits are returned
    is_decode: bool  # every sequence has exactly one new token (fixed shapes, CUDA-graph capturable)
    query_lens_host: list[int]  # host copies the scheduler already knows (never read back with .item())
    context_lens_host: list[int]
    group_block_tables: tuple[torch.Tensor, ...] = ()  # groups 1..: [B, max_blocks] int32 each, same width
    group_slot_mappings: tuple[torch.Tensor, ...] = ()  # groups 1..: [N] int64 each

    @property
    def num_groups(self) -> int:
        return 1 + len(self.group_block_tables)

    def of_group(self, group: int) -> "ForwardBatch":
        """This batch with group `group`'s block tables and slots in place of group 0's."""
        if group == 0:
            return self
        return dataclasses.replace(self, block_tables=self.group_block_tables[group - 1],
                                   slot_mapping=self.group_slot_mappings[group - 1], group_block_tables=(),
                                   group_slot_mappings=())

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]
