"""Padding rows of a CUDA graph route to no expert.

A CUDA graph runs a fixed row count, so the engine pads a step to its graph's size (decode graphs: batch buckets;
piecewise graphs: row buckets of steps that prefill). Left alone, each padding row would be routed to top-k experts
like a real token: the experts op would compute them (at up to 255 padding rows of a piecewise bucket, a
noticeable share of a step), a decode step could stream the weights of experts only padding rows chose, and the
per-expert counters would count them. Instead, while `padding_rows(is_padding)` is active (around a graph's capture,
or each plain replay on the CPU), every MoE block sets the expert ids of the rows `is_padding` marks to -1 right
after routing; `fused_moe` skips such slots on every path (kernel, Triton decode, reference) and does not count
them. `is_padding` is a device tensor the runner rewrites before each replay, so the graph reads the step's
padding from it: one masked_fill per MoE block, no host sync.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_active: list[torch.Tensor] = []  # the innermost padding_rows() mask ([M] bool) last


@contextmanager
def padding_rows(is_padding: torch.Tensor) -> Iterator[None]:
    """Within this context, MoE blocks route the rows `is_padding` ([M] bool, on the model's device; a step runs
    its first N <= M rows) marks nowhere."""
    if is_padding.dim() != 1 or is_padding.dtype != torch.bool:
        raise ValueError(f"is_padding must be a 1-D bool tensor, got {tuple(is_padding.shape)} {is_padding.dtype}")
    _active.append(is_padding)
    try:
        yield
    finally:
        _active.pop()


def masking_padding() -> bool:
    """Whether a padding_rows() mask is active: the experts op then takes ids of -1 (elsewhere, on the CPU, an id
    outside [0, E) is a router bug and raises)."""
    return bool(_active)


def route_padding_nowhere(topk_ids: torch.Tensor) -> torch.Tensor:
    """topk_ids [N, k] with the padding rows' ids set to -1 (unchanged outside `padding_rows`)."""
    if not _active:
        return topk_ids
    is_padding = _active[-1]
    rows = topk_ids.shape[0]
    if rows > is_padding.shape[0]:
        raise ValueError(f"{rows} rows routed under a padding mask of {is_padding.shape[0]} rows")
    return topk_ids.masked_fill(is_padding[:rows, None], -1)
