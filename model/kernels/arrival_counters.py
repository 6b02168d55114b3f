"""Zeroed int32 counters for split Triton kernels whose last program to arrive does the reduction (the decode FP8
linear, the fused router): each program takes a ticket with an acq_rel atomic add, and the last one resets the
counter to 0, so one buffer per (kernel, device) serves every call and every CUDA-graph replay. Calls sharing a buffer
must not run concurrently (the engine runs one stream)."""

import os

import torch

_buffers: dict[tuple[str, torch.device], torch.Tensor] = {}


def arrival_counters(owner: str, device: torch.device, slots: int) -> torch.Tensor:
    """`owner`'s [slots] int32 counters on `device`, zero between calls. Allocated on the first call, which must run
    outside CUDA-graph capture (the engine's warm-up forward does)."""
    key = (owner, device)
    if key not in _buffers:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the {owner} allocates its arrival counters on its first call: make one call outside "
                               "CUDA-graph capture first (a warm-up forward)")
        _buffers[key] = torch.zeros(slots, dtype=torch.int32, device=device)
    return _buffers[key]


def triton_interpreted() -> bool:
    """Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1), where the split kernels round onto
    the narrow dtypes' grids themselves (the interpreter's downcasts are not round-to-nearest-even)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
