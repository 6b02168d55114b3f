"""Small chains of elementwise and reduction ops (RMSNorm, rotary embeddings, residual add + norm), fused into one
kernel each by `torch.compile` on the GPU, as gpt-fast does for decode.

A decode step is hundreds of tiny kernels whose launch gaps, not bytes, set its time (benchmarks/NOTES.md, engine
section); fusing these chains removes about half of them. The functions are free functions of tensors (weights
passed in), so one compiled artifact serves every layer, and `dynamic=True` keeps one artifact across batch sizes.
Elsewhere (CPU, no Triton, `STATICMOE_COMPILE=0`, or `set_enabled(False)` for eager engines) the plain eager
function runs, with the same math.

Outside CUDA-graph capture a compiled call costs more host time than the launches it saves (benchmarks/NOTES.md,
"Prefill steps", change 2), so an eager step uses them only from `EAGER_MIN_ROWS` rows on, where the step is
GPU-bound and the fused kernels' saved memory passes win; decode graphs, warmed up and captured inside
`for_graph_capture()`, always use them (the host cost is paid once).
"""

import contextlib
import functools
import os

import torch

ALLOWED = os.environ.get("STATICMOE_COMPILE", "1") != "0"  # STATICMOE_COMPILE=0: never compile
_enabled = ALLOWED
EAGER_MIN_ROWS = 4096  # outside graph capture, the compiled function runs only from this many rows on
_capturing = False
# Inductor computes a fused chain's 16-bit intermediates in float32 and by default skips rounding them to their dtype:
# add_rms_norm's norm then saw the unrounded sum, unlike eager and HF (on the CPU a quarter of the normed bf16
# values differed, tests/test_fusion.py). Emulating the casts rounds where the eager code rounds.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


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


@contextlib.contextmanager
def for_graph_capture():
    """Compiled kernels at every size while a CUDA graph is warmed up and captured (compiling happens in the
    warm-up, outside the capture)."""
    global _capturing
    _capturing = True
    try:
        yield
    finally:
        _capturing = False


def use_compiled(x: torch.Tensor) -> bool:
    """Whether a fused function called with first argument `x` ([rows, ...]) runs its compiled kernels."""
    return _enabled and x.is_cuda and (_capturing or x.shape[0] >= EAGER_MIN_ROWS)


def compile_fused(fn):
    """`fn` through `torch.compile` as every fused function is compiled."""
    return torch.compile(fn, dynamic=True, options=COMPILE_OPTIONS)


def gpu_fused(fn):
    """`fn` compiled into fused kernels where `use_compiled` says so; eager `fn` otherwise."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled
        if not use_compiled(args[0]):
            return fn(*args)
        if compiled is None:
            # fullgraph=False: past dynamo's recompile limit (a process running many model configs, as the tests
            # do) the call falls back to eager instead of raising
            compiled = compile_fused(fn) if _can_compile() else fn
        return compiled(*args)

    wrapper.eager = fn
    return wrapper
