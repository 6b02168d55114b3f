"""Rank 0 -> workers: what each engine step runs, broadcast as int64 CPU tensors on the gloo control group: one
fixed-size message with the header and the start of the payload, a second only for the rest of a long payload.
Only rank 0 runs the scheduler and the sampler; workers only run the model. Nothing here touches the GPU, so sending
a step adds no device sync on rank 0.

- EAGER steps (prefill chunks, mixed batches, timed steps) travel as the runner's step items — per sequence its new
  tokens, first position, block table and how many of its last rows' logits are wanted — from which every rank
  builds the same ForwardBatch with the same code (`ModelRunner.run_items`).
- GRAPH steps (decode, replayed from a CUDA graph) travel as `DecodeInputs.encode()` (model/engine/decode_inputs.py):
  the real rows' ids, positions and block tables that rank 0 staged for its own replay; each worker fills its own
  graph's inputs from them with the same code (`ModelRunner.replay_encoded`).
"""

import itertools

import numpy as np
import torch
import torch.distributed as dist

from model.engine.model_runner import StepItem

EAGER, GRAPH, STOP = 1, 2, 3
HEADER_LEN = 4  # kind, payload length, graph batch size, graph block-table width
FIRST_LEN = 1024  # values in the first broadcast: the header and up to 1020 payload values

def encode_items(items: list[StepItem]) -> np.ndarray:
    """Per item: (new tokens, first position, logit rows, table width, KV-cache groups), the tokens, then the
    block table of each group."""
    chunks = []
    for tokens, start, tables, logit_rows in items:
        chunks += [(len(tokens), start, int(logit_rows), len(tables[0]), len(tables)), tokens, *tables]
    return np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64)


def decode_items(values: np.ndarray) -> list[StepItem]:
    values = values.tolist()
    items, i = [], 0
    while i < len(values):
        n, start, logit_rows, width, groups = values[i : i + 5]
        i += 5
        tables = [values[i + n + g * width : i + n + (g + 1) * width] for g in range(groups)]
        items.append((values[i : i + n], start, tables, logit_rows))
        i += n + groups * width
    return items


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
