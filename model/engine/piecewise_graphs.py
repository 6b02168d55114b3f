"""Piecewise CUDA graphs of the steps that prefill: the decoder's non-attention pieces (step_pieces.py) captured at
bucketed row counts, replayed around eager attention calls.

A step of N rows runs in the smallest bucket of at least N rows; its last rows are padding. Buckets go by 16 rows up
to 128 and by 256 rows from there to `max_rows` (the largest step the engine runs this way: steps from
fusion.EAGER_MIN_ROWS rows on are GPU-bound and stay eager), so padding costs at most 255 rows of row-wise work.
All pieces of all buckets share one memory pool: they run one after another, and each piece leaves its results in
the static `PieceBuffers`, never in pool memory a later piece could reuse.

Padding rows route to no expert (model/layers/padding_rows.py, from `PieceBuffers.is_padding`), so they cost no
expert work and the expert counters see real tokens only. For the metrics, each bucket is captured a second time
with the MoE timer's event-record nodes around every experts op (as the decode graphs are, model/engine/moe_timer.py)
and that variant replays only in steps sampled for timing.
"""

import logging
import time

import torch

from model.engine import step_pieces
from model.engine.graph_capture import GraphCapture
from model.engine.step_pieces import PieceBuffers
from model.forward_batch import ForwardBatch
from model.layers import fusion
from model.layers.padding_rows import padding_rows

logger = logging.getLogger(__name__)

BUCKET_STEP = 256  # row granularity of the buckets from 256 rows on


def bucket_sizes(max_rows: int) -> list[int]:
    """16, 32, 64, 128, 256, 512, ..., then max_rows itself (all <= max_rows)."""
    sizes = [n for n in (16, 32, 64, 128) if n < max_rows]
    sizes += range(BUCKET_STEP, max_rows, BUCKET_STEP)
    return sorted(set(sizes + [max_rows]))


class _Replayed:
    """What a piece is when CUDA graphs are not available (tests on the CPU): the same call at each replay, on the
    same buffers, which is all a captured graph does."""

    def __init__(self, model, index: int, buf: PieceBuffers):
        self.model, self.index, self.buf = model, index, buf

    def replay(self) -> None:
        with padding_rows(self.buf.is_padding):
            step_pieces.run_piece(self.model, self.index, self.buf)


class PiecewiseGraphs:
    """`capture()` once, then `run(batch, kv_cache)` for any step of at most `max_rows` rows."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, max_rows: int, moe_timer=None,
                 buf: PieceBuffers | None = None):
        """`buf`: buffers of at least `max_rows` rows allocated beforehand (the runner does, before sizing the KV
        cache), else allocated here."""
        self.model = model
        self.device = device
        self.moe_timer = moe_timer  # model/engine/moe_timer.MoeTimer, or None
        self.sizes = bucket_sizes(max_rows)
        self.buf = PieceBuffers.allocate(model, self.sizes[-1], device, dtype) if buf is None else buf
        self.pieces: dict[int, list] = {}  # bucket rows -> its L + 1 pieces (CUDA graphs, or _Replayed)
        self.timed: dict[int, list] = {}  # bucket rows -> the same pieces with the MoE timer's event nodes

    def capture(self) -> None:
        """Capture every bucket's pieces (on the CPU: record them as calls)."""
        started = time.perf_counter()
        capturer = GraphCapture(self.device) if self.device.type == "cuda" else None
        count = step_pieces.num_pieces(self.model)
        for rows in reversed(self.sizes):  # largest first: the pool then fits the others
            buf = self.buf.first(rows)
            if capturer is None:
                self.pieces[rows] = [_Replayed(self.model, i, buf) for i in range(count)]
                continue
            with fusion.for_graph_capture(), padding_rows(buf.is_padding):
                for i in range(count):  # warm-up outside the graph (lazy inits, compiling)
                    step_pieces.run_piece(self.model, i, buf)
                with capturer.after_warm_up():
                    self.pieces[rows] = self._capture_all(capturer, buf, count)
                    timer = self.moe_timer
                    if timer is not None and timer.enabled:  # timing events become graph nodes of this variant
                        timer.begin_capture(("pieces", rows))
                        try:
                            self.timed[rows] = self._capture_all(capturer, buf, count)
                        finally:
                            timer.end_capture()
        if capturer is not None:
            torch.cuda.synchronize(self.device)
        logger.info("captured piecewise graphs of steps that prefill: %d pieces at %d row counts (%s) in %.1f s",
                    count, len(self.sizes), self.sizes, time.perf_counter() - started)

    def _capture_all(self, capturer: GraphCapture, buf: PieceBuffers, count: int) -> list:
        """The `count` pieces of one bucket, each a CUDA graph."""
        return [capturer.capture(lambda i=i: step_pieces.run_piece(self.model, i, buf))[0] for i in range(count)]

    def bucket(self, rows: int) -> int | None:
        """The bucket a step of `rows` rows runs in; None: too large (it runs eagerly)."""
        return next((size for size in self.sizes if size >= rows), None)

    def run(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Float32 logits [S, V] of batch.logits_indices: the pieces of the step's bucket, with each layer's
        attention run eagerly on the real rows between them."""
        rows = batch.num_tokens
        size = self.bucket(rows)
        if size is None:
            raise ValueError(f"a step of {rows} rows is larger than the largest piecewise bucket ({self.sizes[-1]})")
        buf = self.buf.first(size)
        plans = self.model.attention_plans(batch, kv_cache)
        step_pieces.load_inputs(buf, batch)
        pieces = self.pieces[size]
        if size in self.timed and self.moe_timer.sampling:
            pieces = self.timed[size]
            self.moe_timer.graph_replayed(("pieces", size))
        for i, piece in enumerate(pieces[:-1]):
            piece.replay()
            step_pieces.attend(self.model, i, buf, rows, plans, kv_cache)
        pieces[-1].replay()
        return step_pieces.logits(self.model, buf, batch)
