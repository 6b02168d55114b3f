"""Tensor-parallel layers. Column-parallel projections need no class of their own (a plain `Linear` holding the
rank's output rows; only loading differs); these are the layers whose forward changes."""

import torch
import torch.nn.functional as F

from model.layers.linear import Embedding, Linear
from model.layers.norm import RMSNorm
from model.parallel.comm import Comm


class RowParallelLinear(Linear):
    """Holds the rank's input columns; outputs a partial sum. `reduce=True` all-reduces it (then adds the bias);
    `reduce=False` leaves the sum to the caller (one all-reduce for several partial sums) and adds the bias on rank
    0 only, so the sum carries it once."""

    def __init__(self, in_local: int, out_features: int, bias: bool, comm: Comm, reduce: bool):
        super().__init__(in_local, out_features, bias)
        self.comm = comm
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in_local] -> [N, out]
        y = F.linear(x, self.weight)
        if self.reduce:
            y = self.comm.all_reduce(y)
            return y if self.bias is None else y + self.bias
        if self.bias is not None and self.comm.rank == 0:
            y = y + self.bias
        return y


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + rows) of the table; ids elsewhere give zeros here and their row on their own rank."""

    def __init__(self, rows: int, embedding_dim: int, start: int, comm: Comm):
        super().__init__(rows, embedding_dim)
        self.start = start
        self.rows = rows
        self.comm = comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, H]
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)  # [N]
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(out.masked_fill(outside[:, None], 0))


class ShardedRMSNorm(RMSNorm):
    """RMSNorm over a vector split across ranks (OLMoE's q/k norm spans all heads): the squared sum is all-reduced.
    `replicas` ranks hold each element (K/V heads kept by several ranks), so the sum counts them once."""

    def __init__(self, local_size: int, global_size: int, replicas: int, eps: float, comm: Comm):
        super().__init__(local_size, eps)
        self.global_size = global_size
        self.replicas = replicas
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., local_size]
        xf = x.float()
        square_sum = self.comm.all_reduce(xf.square().sum(-1, keepdim=True))  # [..., 1]
        if self.replicas > 1:
            square_sum = square_sum / self.replicas
        normed = xf * torch.rsqrt(square_sum / self.global_size + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]} of {self.global_size}, eps={self.eps}"
