"""Per-row edits of a batch of logits that the host decides each step and the device applies in a few batched ops
with no host synchronisation: token bans, allowed-token lists, additive logit biases and grammar bitmasks.

The host builds flat index lists (row, token) once per step; they travel with non-blocking copies from pinned
memory, and the edits are index_put / masked_fill over fixed-shape tensors.
"""

import torch

NEG_INF = float("-inf")


def _put(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def ban(logits: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """logits[row, token] = -inf for each (row, token)."""
    if pairs:
        index = _put(pairs, torch.int64, logits.device)  # [P, 2]
        logits.index_put_((index[:, 0], index[:, 1]), torch.full((), NEG_INF, device=logits.device))


def allow_only(logits: torch.Tensor, rows: list[int], allowed: list[list[int]]) -> None:
    """Rows `rows` keep only the logits of their `allowed` token ids; everything else becomes -inf."""
    if not rows:
        return
    pairs = [(i, t) for i, ids in enumerate(allowed) for t in ids]
    index = _put([*rows, *[p for pair in pairs for p in pair]], torch.int64, logits.device)
    row_index, flat = index[: len(rows)], index[len(rows):].view(-1, 2)
    blocked = torch.ones(len(rows), logits.shape[1], dtype=torch.bool, device=logits.device)  # [A, V]
    blocked.index_put_((flat[:, 0], flat[:, 1]), torch.zeros((), dtype=torch.bool, device=logits.device))
    logits.index_copy_(0, row_index, logits.index_select(0, row_index).masked_fill(blocked, NEG_INF))


def add_bias(logits: torch.Tensor, entries: list[tuple[int, int, float]]) -> None:
    """logits[row, token] += bias for each (row, token, bias)."""
    if entries:
        index = _put([(r, t) for r, t, _ in entries], torch.int64, logits.device)
        bias = _put([b for _, _, b in entries], logits.dtype, logits.device)
        logits.index_put_((index[:, 0], index[:, 1]), bias, accumulate=True)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Rows `rows` keep only the tokens whose bit is set in `bitmask` [G, ceil(V / 32)] int32 (bit t % 32 of word
    t // 32, as grammar engines write it; a host tensor, pinned on CUDA)."""
    if not rows:
        return
    V = logits.shape[1]
    words = bitmask.to(logits.device, non_blocking=True)  # [G, W]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    allowed = ((words[:, :, None] >> shifts) & 1).view(len(rows), -1)[:, :V].bool()  # [G, V]
    row_index = _put(rows, torch.int64, logits.device)
    logits.index_copy_(0, row_index, logits.index_select(0, row_index).masked_fill(~allowed, NEG_INF))


def bitmask_traffic_bytes(num_rows: int, vocab: int) -> dict:
    """Device memory traffic of apply_bitmask for `num_rows` rows of `vocab` float32 logits (reads + writes)."""
    words = (vocab + 31) // 32
    expanded = num_rows * words * 32  # [G, W, 32] elements
    logits = num_rows * vocab * 4
    steps = {"shift_and": num_rows * words * 4 + expanded * 4,  # int32 [G, W, 32] written
             "to_bool": expanded * 4 + num_rows * vocab,  # [G, V] slice read, bool written
             "invert": 2 * num_rows * vocab,
             "index_select": 2 * logits, "masked_fill": 2 * logits + num_rows * vocab, "index_copy": 2 * logits}
    return {"total_MB": round(sum(steps.values()) / 1e6, 1), "kernels": len(steps) + 2}  # + H2D copy, row index
