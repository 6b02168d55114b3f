"""Which part of a global parameter a rank holds (`ShardSpec`), and which slices of a checkpoint tensor land where
in the rank's local parameter (`regions`).

A split dimension is a list of segments: global range [start, stop) stored at local offset `local_start`. Fused
parameters need several segments on one dimension (a rank's qkv_proj rows are its q rows, then its k rows, then its
v rows; an expert's gate_up rows are its gate columns, then its up columns). Dimensions without segments are whole.
"""

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    start: int  # global, inclusive
    stop: int  # global, exclusive
    local_start: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    split: dict[int, tuple[Segment, ...]] = field(default_factory=dict)  # dim -> segments

    def __post_init__(self):
        if len(self.global_shape) != len(self.local_shape):
            raise ValueError(f"global {self.global_shape} and local {self.local_shape} shapes differ in rank")
        for dim, size in enumerate(self.global_shape):
            segments = self.split.get(dim)
            if segments is None:
                if self.local_shape[dim] != size:
                    raise ValueError(f"dim {dim} is not split but local size {self.local_shape[dim]} != {size}")
                continue
            for seg in segments:
                if not (0 <= seg.start <= seg.stop <= size and seg.local_start + seg.size <= self.local_shape[dim]):
                    raise ValueError(f"segment {seg} does not fit dim {dim} (global {size}, local "
                                     f"{self.local_shape[dim]})")

    def segments(self, dim: int) -> tuple[Segment, ...]:
        return self.split.get(dim, (Segment(0, self.global_shape[dim], 0),))

    @property
    def padded(self) -> bool:
        """True when some local elements come from no global element (vocabulary padding): they must be zeroed."""
        return any(sum(s.size for s in segs) < self.local_shape[d] for d, segs in self.split.items())


def replicated(shape: tuple[int, ...]) -> ShardSpec:
    return ShardSpec(tuple(shape), tuple(shape))


def split_dim(global_shape: tuple[int, ...], dim: int, ranges: list[tuple[int, int]],
              local_size: int | None = None) -> ShardSpec:
    """Global `ranges` of dimension `dim`, stored one after the other from local offset 0."""
    segments, offset = [], 0
    for start, stop in ranges:
        segments.append(Segment(start, stop, offset))
        offset += stop - start
    local = list(global_shape)
    local[dim] = offset if local_size is None else local_size
    return ShardSpec(tuple(global_shape), tuple(local), {dim: tuple(segments)})


def with_split(spec: ShardSpec, dim: int, ranges: list[tuple[int, int]]) -> ShardSpec:
    """`spec` with dimension `dim` split too."""
    extra = split_dim(spec.global_shape, dim, ranges)
    local = list(spec.local_shape)
    local[dim] = extra.local_shape[dim]
    return ShardSpec(spec.global_shape, tuple(local), {**spec.split, **extra.split})


Index = tuple  # of ints and slices


def regions(spec: ShardSpec, piece_index: Index, piece_shape: tuple[int, ...]) -> list[tuple[Index, Index]]:
    """(source index into the checkpoint tensor, destination index into the local parameter) pairs that copy every
    element of one checkpoint piece this rank holds. `piece_index` places the piece in the global parameter (ints
    drop a dimension, slices keep it; missing trailing dimensions are whole), as `model.weight_map.Piece.index`."""
    index = list(piece_index) + [slice(None)] * (len(spec.global_shape) - len(piece_index))
    per_dim = []
    for dim, (size, ix) in enumerate(zip(spec.global_shape, index)):
        squeeze = isinstance(ix, int)
        lo_piece, hi_piece = (ix, ix + 1) if squeeze else ix.indices(size)[:2]
        choices = []
        for seg in spec.segments(dim):
            lo, hi = max(lo_piece, seg.start), min(hi_piece, seg.stop)
            if lo >= hi:
                continue
            local = seg.local_start + lo - seg.start
            src = None if squeeze else slice(lo - lo_piece, hi - lo_piece)
            choices.append((src, local if squeeze else slice(local, local + hi - lo)))
        if not choices:
            return []  # another rank's piece
        per_dim.append(choices)
    out = []
    for combo in itertools.product(*per_dim):
        src = tuple(s for s, _ in combo if s is not None)
        if len(src) != len(piece_shape):
            raise ValueError(f"piece index {piece_index} does not match its shape {piece_shape}")
        out.append((src, tuple(d for _, d in combo)))
    return out
