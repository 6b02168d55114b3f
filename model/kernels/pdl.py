"""Programmatic dependent launch (PDL, sm_90+) for the decode path's Triton kernels: opt-in `STATICMOE_PDL=1`.

Why: a batch-1 decode layer is a chain of short kernels (q/k norm + rotary + KV write, attention, its split combine,
o_proj, router, the MoE's two launches), each a few µs, most of which is start-up: launch, block scheduling, the
first loads' latency, and the predecessor's tail on idle SMs. With PDL a kernel is launched while its predecessor
still runs; its programs start, then wait in `gdc_wait` until the predecessor has finished and its memory is
visible. The two-launch decode MoE run as one launch (the second half's start hidden under the first's tail) gained
3.4 µs of 38 in isolation and ~1.3 µs a layer in the engine on an H100 (benchmarks/NOTES.md "Session 20").

The rule every kernel taking `PDL` follows (`wait_for_predecessor` at its very top): no global load of anything an
earlier kernel writes, and no store at all, before the wait — the stream's earlier kernels may still be running,
and the caching allocator may have handed this kernel memory they still read. Programs then signal
`gdc_launch_dependents`, so the next kernel's launch overlaps this one. A kernel launched without the PDL attribute
(cuBLAS, Inductor's) waits for its predecessor in full as usual, and `gdc_wait` returns at once when nothing is
pending, so mixing is safe. In a CUDA graph the launch attribute becomes a programmatic edge (CUDA >= 12.3).
"""

import functools

from model.kernels.arrival_counters import triton_interpreted
from model.kernels.knobs import env_switch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None


@functools.cache
def enabled() -> bool:
    """`STATICMOE_PDL=1` (read once per process): opt-in until a GPU run has checked and timed it."""
    return env_switch("STATICMOE_PDL")


def launch(device_is_cuda: bool = True) -> dict:
    """Keyword arguments for a kernel launch: its `PDL` constexpr and Triton's `launch_pdl` option, both on only when
    switched on and compiled (the interpreter has no launch attributes)."""
    on = enabled() and device_is_cuda and not triton_interpreted()
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


if tl is not None:

    @triton.jit
    def wait_for_predecessor(PDL: tl.constexpr):
        """A PDL kernel's first statement: wait until the stream's previous kernel has finished and its writes are
        visible, then let the next kernel launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
