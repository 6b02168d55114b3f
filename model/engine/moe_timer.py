"""Timing of the routed-expert op (`fused_moe`: plan, GEMMs, combine) of every MoE block, inside the decode CUDA
graphs, for the tensor-core utilization metric.

`time_experts` wraps each MoE block's experts op (`SparseMoeBlock.experts`) from outside the model: forward hooks
call `start()` / `stop()` immediately around it, so the router, top-k and the shared expert stay outside the window
and the model itself knows nothing of timing. What the two calls do depends on where the block runs:
- while a decode CUDA graph is captured (`begin_capture` .. `end_capture`): they record timing events made with
  `external=True`, which stream capture turns into event-record nodes of that graph (CUDA 12+; an event without the
  flag would become a fork/join edge instead). Every replay re-records them, so each graph owns one (start, end)
  pair per MoE layer and a replay costs no host work for timing. The runner captures each decode step twice, with
  and without these nodes, and replays the timed variant only in sampled steps (`sampling`), since the nodes slow
  every replay down. Decode steps stay graph replays: timing never makes a step eager.
- in a sampled eager step (prefill, or decode without a graph): fresh timing events on CUDA; on the CPU, where
  `fused_moe` runs synchronously, the wall clock (`WallClockMark`).
- otherwise: nothing.

A sampled step's pairs are read with `elapsed_time` once all of them are complete, never waited for. The engine
reads the sampled token ids back every step, after which that step's events are complete, so `end_step` usually
reads them at once. If not (the read came first, or the same graph was replayed again and that replay is still
running: `elapsed_time` raises "not complete"), the sample stays pending and is tried again at the next read. A
graph's events hold the times of its latest replay only, so a newer sample of the same graph replaces a pending
one (counted in `skipped`). A complete read after a later replay of the same graph measures that replay, which
computed the same rows, so its FLOPs are the same.
"""

import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

MAX_PENDING = 4  # samples waiting for their events; older ones are dropped (counted in `skipped`)

_marks_of = weakref.WeakKeyDictionary()  # experts op -> (its marks, their hook handles)


def time_experts(blocks, marks) -> None:
    """Call `marks.start()` right before and `marks.stop()` right after each block's experts op (None: neither).
    An op has one set of marks: a later call replaces an earlier one's."""
    for block in blocks:
        _, handles = _marks_of.pop(block.experts, (None, ()))
        for handle in handles:
            handle.remove()
        if marks is not None:
            _marks_of[block.experts] = (marks, (
                block.experts.register_forward_pre_hook(lambda module, args: marks.start()),
                block.experts.register_forward_hook(lambda module, args, out: marks.stop())))


def marks_of(experts):
    """The marks `time_experts` put around this experts op, or None."""
    return _marks_of.get(experts, (None, ()))[0]


class WallClockMark:
    """CPU stand-in for a timing event, with the calls the timer uses: record, query, elapsed_time (ms)."""

    __slots__ = ("t",)

    def __init__(self):
        self.t: float | None = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return self.t is not None

    def elapsed_time(self, end: "WallClockMark") -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("both marks must be recorded before calculating elapsed time")
        return (end.t - self.t) * 1e3


@dataclass
class _Sample:
    pairs: list  # [(start, end)], one per MoE layer
    flops: float  # routed-expert GEMM FLOPs of the rows fused_moe computed (a graph's padding rows route nowhere)
    graph_key: object  # the replayed graph (its pairs are re-recorded by every replay), or None: eager marks


def read_seconds(pairs: list) -> float | None:
    """Σ elapsed time of the pairs in seconds, or None while any is still running. Never waits."""
    if not pairs or not pairs[-1][1].query():  # the step's last mark: cheap early exit while it runs
        return None
    total_ms = 0.0
    try:
        for start, end in pairs:
            total_ms += start.elapsed_time(end)  # raises if either record is not complete (another replay)
    except (RuntimeError, ValueError):
        return None
    return total_ms / 1e3


class MoeTimer:
    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.graph_pairs: dict[object, list] = {}  # graph key -> its [(start, end)] event pairs
        self.skipped = 0  # samples never read (replaced by a newer replay of their graph, or too many pending)
        self.read_host_seconds = 0.0  # host time spent reading samples (the cost of the metric)
        self._capture: list | None = None  # pairs of the graph being captured
        self._capture_key = None
        self._sampled = False  # the current step is sampled: eager marks are recorded, or its graph's pairs read
        self._step_pairs: list = []
        self._open = None  # start mark of the fused_moe call in progress
        self._replayed_key = None  # graph replayed by the current step
        self._pending: deque[_Sample] = deque()

    def attach(self, blocks) -> None:
        time_experts(blocks, self if self.enabled else None)

    # ---- called around each experts op (forward hooks, see time_experts) ----------------------------------------
    def start(self) -> None:
        if self._capture is not None or self._sampled:
            self._open = self._mark()

    def stop(self) -> None:
        if self._open is None:
            return
        pair = (self._open, self._mark())
        self._open = None
        (self._capture if self._capture is not None else self._step_pairs).append(pair)

    def _mark(self):
        if not self.cuda:
            mark = WallClockMark()
        elif self._capture is not None:
            mark = torch.cuda.Event(enable_timing=True, external=True)  # an event-record node of the graph
        else:
            mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        return mark

    # ---- called by the model runner ----------------------------------------------------------------------------------
    def begin_capture(self, key) -> None:
        if self.enabled:
            self._capture, self._capture_key, self._open = [], key, None

    def end_capture(self) -> None:
        if self._capture is not None:
            self.graph_pairs[self._capture_key] = self._capture
        self._capture, self._capture_key, self._open = None, None, None

    @property
    def sampling(self) -> bool:
        """The current step is sampled: the runner replays the graph variant that records the timing events."""
        return self._sampled

    def graph_replayed(self, key) -> None:
        self._replayed_key = key

    # ---- called by the stats collector (engine thread; end_step and poll under the collector's lock) ------------
    def begin_step(self, sampled: bool) -> None:
        self._sampled = sampled and self.enabled
        self._step_pairs, self._replayed_key, self._open = [], None, None

    def end_step(self, flops: float) -> None:
        """After the step was enqueued. `flops`: what fused_moe computed in it (its tokens': a graph's padding rows
        route to no expert)."""
        sampled, key = self._sampled, self._replayed_key
        self._sampled = False
        pairs = self.graph_pairs.get(key) if key is not None else self._step_pairs
        self._step_pairs, self._replayed_key = [], None
        if not sampled or not pairs:
            return
        if key is not None:
            stale = [s for s in self._pending if s.graph_key == key]
            for s in stale:
                self._pending.remove(s)
            self.skipped += len(stale)
        self._pending.append(_Sample(pairs, flops, key))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft()
            self.skipped += 1

    def poll(self) -> list[tuple[float, float]]:
        """(seconds, FLOPs) of the pending samples whose events are complete, oldest first. Never waits."""
        started = time.perf_counter()
        ready = []
        while self._pending:
            seconds = read_seconds(self._pending[0].pairs)
            if seconds is None:
                break  # still running (stream order: so are the later ones)
            ready.append((seconds, self._pending.popleft().flops))
        self.read_host_seconds += time.perf_counter() - started
        return ready
