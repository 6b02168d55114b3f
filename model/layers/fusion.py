"""Small chains of elementwise and reduction ops (RMSNorm, rotary embeddings, residual add + norm), fused into one
kernel each by `torch.compile` on the GPU, as gpt-fast does for decode.

A decode step is hundreds of tiny kernels whose launch gaps, not bytes, set its time (benchmarks/NOTES.md, engine
section); fusing these chains removes about half of them. The functions are free functions of tensors (weights
passed in), so one compiled artifact serves every layer, and `dynamic=True` keeps one artifact across batch sizes.
Elsewhere (CPU, no Triton, `STATICMOE_COMPILE=0`, or `set_enabled(False)` for eager engines) the plain eager
function runs, with the same math.
"""

import functools
import os

import torch

ALLOWED = os.environ.get("STATICMOE_COMPILE", "1") != "0"  # STATICMOE_COMPILE=0: never compile
_enabled = ALLOWED


def set_enabled(enabled: bool) -> None:
    """Turns GPU fusion on or off for the whole process (the engine turns it off with enforce_eager); it stays off
    when STATICMOE_COMPILE=0."""
    global _enabled
    _enabled = enabled and ALLOWED


def _can_compile() -> bool:
    try:
        import triton  # noqa: F401  (inductor's GPU backend)
    except ImportError:
        return False
    return True


def gpu_fused(fn):
    """`fn` compiled into fused kernels when its first argument is a CUDA tensor; eager `fn` otherwise."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not (_enabled and args[0].is_cuda):
            return fn(*args)
        if compiled is None:
            # fullgraph=False: past dynamo's recompile limit (a process running many model configs, as the tests
            # do) the call falls back to eager instead of raising
            compiled = torch.compile(fn, dynamic=True) if _can_compile() else fn
        return compiled(*args)

    wrapper.eager = fn
    return wrapper
