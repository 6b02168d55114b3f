"""Linear and embedding layers whose parameters start uninitialised (the loader fills them), so building a
30B-parameter model costs no time in initialisers."""

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import triton_gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] · weight [out, in]ᵀ (+ bias): decode rows at the shapes where the Triton split-K kernel beats
    cuBLAS go to it (model/kernels/triton_gemv.py), everything else to F.linear."""
    if triton_gemv.applies(x, weight):
        return triton_gemv.decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, in] -> [N, out]
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [N] -> [N, H]
        return F.embedding(ids, self.weight)
