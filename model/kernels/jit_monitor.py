"""Triton kernels specialised for the first time after the engine started.

Triton compiles a kernel once per combination of its compile-time constants and integer-argument specialisations
(equal to 1, divisible by 16). Start-up runs the shapes it can foresee (the memory-profiling step, the decode and
piecewise graph captures); a step whose shapes it did not foresee (e.g. attention over a new split count in a mixed
step) specialises a kernel on first use and holds that step for the compile: ~0.1–1 s, or milliseconds when the
on-disk cache has it. Fresh machines and containers start with an empty disk cache, so such steps land inside the
first requests' latency, where benchmarks have seen seconds of unexplained wall time (benchmarks/NOTES.md,
session 17).

`start()` (called once start-up is over) hooks Triton's JIT cache: each new specialisation is counted and logged
once, as a warning, with the kernel's signature, so a log shows which shapes start-up should warm. The hook chains
any hook installed before it and never changes what Triton does.
"""

import logging
import threading

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_count = 0
_installed = False


def specializations_after_start() -> int:
    """Triton specialisations first needed since `start()` (0 before it, or without Triton)."""
    return _count


def record(kernel: str) -> None:
    """Count one new specialisation and log it (kernel: Triton's description of the kernel and its signature)."""
    global _count
    with _lock:
        _count += 1
        n = _count
    logger.warning("Triton specialised a kernel after start-up (#%d; the step waited for it): %s", n, kernel[:400])


def start(runtime=None) -> bool:
    """Install the hook on Triton's runtime knobs (`runtime`: for tests, an object with a `jit_cache_hook`
    attribute); False where Triton or the hook is not available. Idempotent."""
    global _installed
    if _installed:
        return True
    if runtime is None:
        try:
            import triton
            runtime = triton.knobs.runtime
        except (ImportError, AttributeError):  # CPU-only installs; a Triton without knobs (< 3.4)
            return False
    previous = getattr(runtime, "jit_cache_hook", None)

    def hook(*args, **kwargs):
        if not kwargs.get("is_manual_warmup", False):
            record(str(kwargs.get("repr") or kwargs.get("key") or "unknown kernel"))
        return previous(*args, **kwargs) if previous is not None else False  # falsy: Triton goes on compiling

    runtime.jit_cache_hook = hook
    _installed = True
    return True
