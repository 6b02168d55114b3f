"""Rank 0 -> workers: what each engine step runs, broadcast as int64 CPU tensors on the gloo control group: one
fixed-size message with the header and the start of the payload, a second only for the rest of a long payload.
Only rank 0 runs the scheduler and the sampler; workers only run the model. Nothing here touches the GPU, so sending
a step adds no device sync on rank 0.

- EAGER steps (prefill chunks, mixed batches, timed steps) travel as the scheduler's items — per sequence its new
  tokens, first position, block table and whether it samples — from which every rank builds the same ForwardBatch
  with the same code (`ModelRunner._prefill_batch`).
- GRAPH steps (decode, replayed from a CUDA graph) travel as arrays: token ids [n], positions [n], block tables
  [n, w] (w = the graph's width), taken from the block manager's host mirror in one gather, so a 256-sequence decode
  step costs no per-block Python work; each worker fills its own graph's inputs from them.
"""

import itertools

import numpy as np
import torch
import torch.distributed as dist

EAGER, GRAPH, STOP = 1, 2, 3
HEADER_LEN = 4  # kind, payload length, graph batch size, graph block-table width
FIRST_LEN = 1024  # values in the first broadcast: the header and up to 1020 payload values

Item = tuple[list[int], int, list[int], bool]  # (new token ids, first position, block table, samples)


def items_of(scheduler_output) -> list[Item]:
    """As `ModelRunner.build_batch` reads a SchedulerOutput."""
    items = []
    for s in scheduler_output.scheduled:
        seq = s.seq
        start = seq.num_computed_tokens
        items.append((seq.token_ids[start : start + s.num_new_tokens], start, seq.block_table, s.samples))
    return items


def encode_items(items: list[Item]) -> np.ndarray:
    chunks = []
    for tokens, start, table, samples in items:
        chunks += [(len(tokens), start, int(samples), len(table)), tokens, table]
    return np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64)


def decode_items(values: np.ndarray) -> list[Item]:
    values = values.tolist()
    items, i = [], 0
    while i < len(values):
        n, start, samples, width = values[i : i + 4]
        i += 4
        items.append((values[i : i + n], start, values[i + n : i + n + width], bool(samples)))
        i += n + width
    return items


def encode_decode_rows(scheduler_output, width: int, block_manager=None) -> np.ndarray:
    """[ids (n), positions (n), block tables (n * width)] of a decode step; tables zero past each sequence's end."""
    seqs = [s.seq for s in scheduler_output.scheduled]
    n = len(seqs)
    out = np.zeros(2 * n + n * width, dtype=np.int64)
    out[:n] = [seq.token_ids[-1] for seq in seqs]
    out[n : 2 * n] = [len(seq.token_ids) - 1 for seq in seqs]
    tables = out[2 * n :].reshape(n, width)
    mirror = getattr(block_manager, "tables", None)
    if mirror is not None and mirror.shape[1] >= width and all(getattr(seq, "block_row", -1) >= 0 for seq in seqs):
        tables[:] = mirror[[seq.block_row for seq in seqs], :width]
    else:
        for row, seq in zip(tables, seqs):
            row[: len(seq.block_table)] = seq.block_table
    return out


def split_decode_rows(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(values) // (2 + width)
    return values[:n], values[n : 2 * n], values[2 * n :].reshape(n, width)


def send(group, kind: int, payload: np.ndarray | None = None, graph_key: tuple[int, int] | None = None) -> None:
    """One broadcast of FIRST_LEN values (header + the start of the payload); a second only for a longer payload.
    Small steps — where latency matters most — thus cost one round of the control group."""
    payload = np.zeros(0, dtype=np.int64) if payload is None else payload
    b, w = graph_key or (0, 0)
    first = np.zeros(FIRST_LEN, dtype=np.int64)
    first[:HEADER_LEN] = kind, len(payload), b, w
    head = payload[: FIRST_LEN - HEADER_LEN]
    first[HEADER_LEN : HEADER_LEN + len(head)] = head
    dist.broadcast(torch.from_numpy(first), 0, group=group)
    if len(payload) > len(head):
        dist.broadcast(torch.from_numpy(np.ascontiguousarray(payload[len(head) :])), 0, group=group)


def receive(group) -> tuple[int, np.ndarray, tuple[int, int] | None]:
    """Blocks until rank 0 sends a step: (kind, payload, graph key or None)."""
    first = torch.empty(FIRST_LEN, dtype=torch.int64)
    dist.broadcast(first, 0, group=group)
    kind, length, b, w = first[:HEADER_LEN].tolist()
    if kind not in (EAGER, GRAPH, STOP):
        raise RuntimeError(f"unknown step message kind {kind}")
    inline = min(length, FIRST_LEN - HEADER_LEN)
    payload = first[HEADER_LEN : HEADER_LEN + inline].numpy()
    if length > inline:
        rest = torch.empty(length - inline, dtype=torch.int64)
        dist.broadcast(rest, 0, group=group)
        payload = np.concatenate([payload, rest.numpy()])
    return kind, payload, ((b, w) if kind == GRAPH else None)
