"""`DecodeInputs`: the inputs of a decode step replayed from a CUDA graph of b rows and block-table width w — its two
flat static buffers, their host staging copies, and their wire form for the worker ranks of a parallel model.

Layout with G KV-cache groups (model/kv_groups.py; G = 1 without sliding-window layers): int64 [(2 + G) b] = input
ids, positions, KV slots of each group; int32 [b + G b w] = context lengths, block tables of each group. Rows past
the n real ones are padding: token PAD_TOKEN at position 0 in each group's own padding block (group g's is block g;
PAD_BLOCK = 0 for group 0) with context length 1, writing no K/V (slot -1), so a padding row computes the same
thing at every replay and never touches a real sequence's cache.
The wire form is the real rows' ids, positions and block tables; slots and context lengths follow from them, so
every rank derives them with the same code (`fill`).
"""

import numpy as np
import torch

from model.forward_batch import ForwardBatch
from model.kv_groups import null_block

PAD_BLOCK = 0  # reserved KV block; slot 0 holds the padding token's K/V (group 0's; group g's pad block is g)
PAD_TOKEN = 0


def static_decode_batch(b: int, w: int, device, num_groups: int = 1
                        ) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
    """(a decode ForwardBatch of b padding rows whose tensors are views of the two flat buffers, int64 buffer,
    int32 buffer): what a CUDA graph captures, and what each replay refills."""
    pad_tables = [null_block(g) for g in range(num_groups) for _ in range(b * w)]
    int64_inputs = torch.tensor([PAD_TOKEN] * b + [0] * b + [-1] * (num_groups * b), dtype=torch.int64,
                                device=device)
    int32_inputs = torch.tensor([1] * b + pad_tables, dtype=torch.int32, device=device)
    slots = [int64_inputs[(2 + g) * b : (3 + g) * b] for g in range(num_groups)]
    tables = [int32_inputs[b + g * b * w : b + (g + 1) * b * w].view(b, w) for g in range(num_groups)]
    batch = ForwardBatch(
        input_ids=int64_inputs[:b], positions=int64_inputs[b : 2 * b], slot_mapping=slots[0],
        block_tables=tables[0], context_lens=int32_inputs[:b],
        query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device),
        logits_indices=torch.arange(b, dtype=torch.int64, device=device), is_decode=True,
        query_lens_host=[1] * b, context_lens_host=[1] * b,
        group_block_tables=tuple(tables[1:]), group_slot_mappings=tuple(slots[1:]),
    )
    return batch, int64_inputs, int32_inputs


class DecodeInputs:
    """Host staging of one graph's two input buffers (pinned on CUDA), with numpy views of their fields. Rows at or
    past the real batch hold the padding values; `fill` restores them only where the last fill had real rows."""

    def __init__(self, int64_inputs: torch.Tensor, int32_inputs: torch.Tensor, width: int, block_size: int,
                 pin: bool, num_groups: int = 1):
        self.width, self.block_size, self.num_groups = width, block_size, num_groups
        self.device_int64, self.device_int32 = int64_inputs, int32_inputs
        self.host_int64 = int64_inputs.cpu().pin_memory() if pin else int64_inputs.clone()  # padding values
        self.host_int32 = int32_inputs.cpu().pin_memory() if pin else int32_inputs.clone()
        b = len(int32_inputs) // (1 + num_groups * width)
        int64_values, int32_values = self.host_int64.numpy(), self.host_int32.numpy()
        self.ids, self.pos = int64_values[:b], int64_values[b : 2 * b]
        self.slots = int64_values[2 * b :].reshape(num_groups, b)  # [G, b]
        self.ctx, self.tables = int32_values[:b], int32_values[b:].reshape(num_groups, b, width)  # [G, b, w]
        self.pad_blocks = np.array([null_block(g) for g in range(num_groups)], dtype=np.int32)[:, None, None]
        self.row_index = np.arange(b)
        self.num_real = 0  # real rows of the last fill
        self.copied = torch.cuda.Event() if pin else None  # recorded after each copy out of these buffers

    def fill(self, ids, positions, tables) -> None:
        """The n real rows: token ids [n], positions [n], block tables [G, n, width] (or [n, width] for one
        group; 0 past each sequence's end)."""
        if self.copied is not None:
            self.copied.synchronize()  # the last copy out of the staging buffers is done (it always is after a sync)
        n, bs, g = len(ids), self.block_size, self.num_groups
        self.ids[:n], self.pos[:n] = ids, positions
        self.tables[:, :n] = np.asarray(tables).reshape(g, n, self.width)
        pos = self.pos[:n]
        self.slots[:, :n] = self.tables[:, self.row_index[:n], pos // bs] * bs + pos % bs
        self.ctx[:n] = pos + 1
        if n < self.num_real:
            self.ids[n : self.num_real], self.pos[n : self.num_real] = PAD_TOKEN, 0
            self.slots[:, n : self.num_real] = -1
            self.ctx[n : self.num_real], self.tables[:, n : self.num_real] = 1, self.pad_blocks
        self.num_real = n

    def copy_to_device(self) -> None:
        """One copy per buffer into the graph's static inputs, on the current stream."""
        self.device_int64.copy_(self.host_int64, non_blocking=True)
        self.device_int32.copy_(self.host_int32, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def encode(self) -> np.ndarray:
        """The wire form of the last fill: [ids (n), positions (n), block tables (G * n * width)] as int64."""
        n = self.num_real
        return np.concatenate([self.ids[:n], self.pos[:n], self.tables[:, :n].reshape(-1).astype(np.int64)])

    def fill_encoded(self, values: np.ndarray) -> None:
        n = len(values) // (2 + self.num_groups * self.width)
        self.fill(values[:n], values[n : 2 * n], values[2 * n :].reshape(self.num_groups, n, self.width))
