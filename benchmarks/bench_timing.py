"""Timers and device ceilings for the benchmarks.

CUDA: each call is timed by its own pair of CUDA events, with L2 flushed (a 256 MB buffer zeroed) before it, so no
call finds the previous call's weights or activations in L2 (as in a real model, where every layer has its own
weights); the median is reported. The flush runs on the GPU while the CPU enqueues the call, so launch overhead only
shows where the GPU would otherwise idle. CPU (smoke mode): perf_counter around each call.
"""

import statistics
import time

import torch

L2_FLUSH_BYTES = 256 << 20


class Timer:
    def __init__(self, device: torch.device, budget_ms: float, min_iters: int = 3, max_iters: int = 100):
        self.device = device
        self.budget_ms = budget_ms
        self.min_iters, self.max_iters = min_iters, max_iters
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def _once(self, fn) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median_ms(self, fn, warmup: int = 1) -> float:
        """Median over as many calls as fit in the budget (at least min_iters, at most max_iters)."""
        for _ in range(warmup):
            fn()
        first = self._once(fn)
        iters = int(min(self.max_iters, max(self.min_iters, self.budget_ms / max(first, 1e-3))))
        if self.device.type != "cuda":
            return statistics.median([first] + [self._once(fn) for _ in range(iters - 1)])
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def interleaved_median_ms(self, fns: list) -> list[float]:
        """Median of each fn, timed in turns call by call (fn0, fn1, fn0, fn1, ...), so clock and power drift over the
        run hits every variant alike (back to back, the one timed second on a hot H100 ran 3-10% slower)."""
        for fn in fns:
            fn()
        first = max(self._once(fn) for fn in fns)
        iters = int(min(self.max_iters, max(self.min_iters, self.budget_ms / max(first, 1e-3))))
        times = [[] for _ in fns]
        for _ in range(iters):
            for fn, out in zip(fns, times):
                out.append(self._once(fn))
        return [statistics.median(t) for t in times]



def graph_ms(fn, replays: int = 100, calls: int = 1) -> float:
    """Mean time of one call of `fn` from a CUDA graph that captures `calls` calls of it (static inputs), replayed
    back to back. calls > 1 is how a model's decode graph holds the op, once per layer: the graph's own launch
    cost is then shared instead of charged to one op."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up allocator and lazy initialisation outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    return replay_ms(graph, replays) / calls


def graph_cycle_ms(fns: list, replays: int = 100) -> float:
    """Mean time of one replay when each of `fns` is captured in its own graph (one call each) and the graphs are
    replayed in turn. With fns over different weights (moe_cases.expert_rotations) no replay finds its weights in
    L2 from the one before, as in a model, where each layer reads its own; graph_ms(fn) re-reads the same bytes."""
    if len(fns) == 1:
        return graph_ms(fns[0], replays)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            for _ in range(3):  # warm up allocator and lazy initialisation outside the capture
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        graphs.append(torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[-1]):
            fn()
    rounds = max(1, -(-replays // len(graphs)))
    for g in graphs:
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        for g in graphs:
            g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (rounds * len(graphs))


def replay_ms(graph: "torch.cuda.CUDAGraph", replays: int) -> float:
    """Mean time of one of `replays` back-to-back replays of a captured graph, from CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def dense_gemm_tflops(timer: Timer, n: int, dtype: torch.dtype) -> dict:
    """cuBLAS (or CPU BLAS) n×n×n GEMM: the compute ceiling measured in the same run."""
    a = torch.randn(n, n, device=timer.device).to(dtype)
    b = torch.randn(n, n, device=timer.device).to(dtype)
    out = torch.empty(n, n, device=timer.device, dtype=dtype)
    ms = timer.median_ms(lambda: torch.mm(a, b, out=out), warmup=2)
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


def copy_bandwidth_gbps(timer: Timer, nbytes: int) -> dict:
    """Device-to-device copy: bytes read + bytes written per second (the bandwidth ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), warmup=2)
    return {"bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / ms / 1e6}
