"""Programmatic dependent launch (PDL, sm_90+) for the decode path's Triton kernels: opt-in `STATICMOE_PDL=1`.

Why: a batch-1 decode layer is a chain of short kernels (q/k norm + rotary + KV write, attention, its split combine,
o_proj, router, the MoE's two launches), each a few µs, most of which is start-up: launch, block scheduling, the
first loads' latency, and the predecessor's tail on idle SMs. With PDL a kernel is launched while its predecessor
still runs; its programs start, then wait in `gdc_wait` until the predecessor has finished and its memory is
visible. The two-launch decode MoE run as one launch (the second half's start hidden under the first's tail) gained
3.4 µs of 38 in isolation and ~1.3 µs a layer in the engine on an H100 (benchmarks/NOTES.md "Session 20").

The rule every kernel taking `PDL` follows (`wait_for_predecessor` at its very top): no global load of anything an
earlier kernel writes, and no store at all, before the wait — the stream's earlier kernels may still be running,
and the caching allocator may have handed this kernel memory they still read. A kernel launched without the PDL
attribute (cuBLAS, Inductor's) waits for its predecessor in full as usual, and `gdc_wait` returns at once when
nothing is pending, so mixing is safe. In a CUDA graph the launch attribute becomes a programmatic edge (CUDA >= 12.3).

When the next kernel may launch: as each program exits (the implicit trigger), not at its start. Session 20's version
signalled `gdc_launch_dependents` right after the wait, and on the H100 the FP8 decode MoE at Qwen3 T = 1 then took
24.8 µs against 20.5 without PDL (benchmarks/NOTES.md "Session 21"): the successor's programs become resident and sit
in their wait while the predecessor still has programs to run, as the CUDA GEMMs' early trigger once slowed large
layers (NOTES v3b). The overlap left is the successor's launch and prologue under the predecessor's last programs.
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
    """`STATICMOE_PDL=1` (read once per process). Off by default: an H100 timed the engine step the same with and
    without it (docs/kernel_switches.md)."""
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
        visible. The next kernel may launch once every program of this one has exited (module docstring)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
