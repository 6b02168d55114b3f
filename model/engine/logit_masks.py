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


_BITS_OF_A_BYTE: dict[torch.device, torch.Tensor] = {}


def _bits_of_a_byte(device: torch.device) -> torch.Tensor:
    """[8] uint8: 1, 2, 4, ..., 128 on `device` (made there once, by device ops: no host copy per step)."""
    bits = _BITS_OF_A_BYTE.get(device)
    if bits is None:
        bits = torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=device),
                                        torch.arange(8, dtype=torch.uint8, device=device))
        _BITS_OF_A_BYTE[device] = bits
    return bits


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Rows `rows` keep only the tokens whose bit is set in `bitmask` [G, ceil(V / 32)] int32 (bit t % 32 of word
    t // 32, as grammar engines write it; a host tensor, pinned on CUDA).

    Read as bytes (little-endian, as on x86 and the GPU: token t is bit t % 8 of byte t // 8), the words expand to
    a [G, 4W, 8] bool mask through one uint8 AND and one compare, and when every row is constrained (the usual
    decode batch) the mask is applied in place: about 120 MB of device traffic for 64 rows of a 152k vocabulary,
    against 350 MB for an int32 [G, W, 32] shift-and-mask plus an index_select / index_copy round trip
    (benchmarks/bench_grammar_masks.py counts them)."""
    if not rows:
        return
    G, V = len(rows), logits.shape[1]
    words = bitmask.to(logits.device, non_blocking=True)  # [G, W]
    as_bytes = words.view(torch.uint8)  # [G, 4W]
    blocked = ((as_bytes[:, :, None] & _bits_of_a_byte(logits.device)) == 0).view(G, -1)[:, :V]  # [G, V]
    if G == logits.shape[0] and rows == list(range(G)):
        logits.masked_fill_(blocked, NEG_INF)
        return
    row_index = _put(rows, torch.int64, logits.device)
    logits.index_copy_(0, row_index, logits.index_select(0, row_index).masked_fill_(blocked, NEG_INF))
