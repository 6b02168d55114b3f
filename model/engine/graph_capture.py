"""Capturing many CUDA graphs back to back: the decode graphs (model_runner.py) and the piecewise graphs of steps
that prefill (piecewise_graphs.py) both capture here.

All graphs of one `GraphCapture` share one memory pool and one side stream. Not torch.cuda.graph's context, which
synchronises the device, runs the garbage collector and empties the allocator's caches at every capture (~2000
captures for the pieces of a 48-layer model); instead the caller orders the side stream after its warm-up once per
group of captures (`after_warm_up`).
"""

from contextlib import contextmanager
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class GraphCapture:
    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    @contextmanager
    def after_warm_up(self):
        """Captures inside this block see everything queued so far on the current stream (the warm-up that wrote
        the static inputs and ran lazy initialisation); work queued after the block sees the captures' side
        stream."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            yield
        finally:
            current.wait_stream(self.stream)

    def capture(self, forward: Callable[[], T]) -> tuple["torch.cuda.CUDAGraph", T]:
        """`forward()` captured as a CUDA graph in the shared pool; also returns what it returned (its static
        outputs, which each replay rewrites)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                out = forward()
            except BaseException:
                try:  # end the capture (the stream must leave capture mode), but report the first error
                    graph.capture_end()
                except Exception:  # noqa: BLE001 - the capture is invalid anyway; the error above says why
                    pass
                raise
            graph.capture_end()
        return graph, out
