"""Rank 0 -> workers: what each engine step runs, as two broadcasts of int64 CPU tensors on the gloo control group
(a fixed header, then the payload). A step is sent as the scheduler's items — per sequence its new tokens, first
position, block table and whether it samples — from which every rank builds the same ForwardBatch with the same
code (`ModelRunner._prefill_batch`), or fills its own decode CUDA graph's inputs.

Only rank 0 runs the scheduler and sampler; workers only run the model. Nothing here touches the GPU, so sending a
step adds no device sync on rank 0.
"""

import torch
import torch.distributed as dist

EAGER, GRAPH, STOP = 1, 2, 3
HEADER_LEN = 4  # kind, payload length, graph batch size, graph block-table width

Item = tuple[list[int], int, list[int], bool]  # (new token ids, first position, block table, samples)


def items_of(scheduler_output) -> list[Item]:
    """As `ModelRunner.build_batch` reads a SchedulerOutput."""
    items = []
    for s in scheduler_output.scheduled:
        seq = s.seq
        start = seq.num_computed_tokens
        items.append((seq.token_ids[start : start + s.num_new_tokens], start, list(seq.block_table), s.samples))
    return items


def encode(items: list[Item]) -> list[int]:
    values = []
    for tokens, start, table, samples in items:
        values += [len(tokens), start, int(samples), len(table)]
        values += tokens
        values += table
    return values


def decode(values: list[int]) -> list[Item]:
    items, i = [], 0
    while i < len(values):
        n, start, samples, width = values[i : i + 4]
        i += 4
        tokens, table = values[i : i + n], values[i + n : i + n + width]
        i += n + width
        items.append((tokens, start, table, bool(samples)))
    return items


def send_step(group, kind: int, items: list[Item] = (), graph_key: tuple[int, int] | None = None) -> None:
    payload = encode(items)
    b, w = graph_key or (0, 0)
    dist.broadcast(torch.tensor([kind, len(payload), b, w], dtype=torch.int64), 0, group=group)
    if payload:
        dist.broadcast(torch.tensor(payload, dtype=torch.int64), 0, group=group)


def receive_step(group) -> tuple[int, list[Item], tuple[int, int] | None]:
    """Blocks until rank 0 sends a step: (kind, items, graph key or None)."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, 0, group=group)
    kind, length, b, w = header.tolist()
    if kind not in (EAGER, GRAPH, STOP):
        raise RuntimeError(f"unknown step message kind {kind}")
    items = []
    if length:
        payload = torch.empty(length, dtype=torch.int64)
        dist.broadcast(payload, 0, group=group)
        items = decode(payload.tolist())
    return kind, items, ((b, w) if kind == GRAPH else None)
