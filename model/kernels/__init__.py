"""Python face of the csrc kernels: checked custom ops, pure-torch references, router helpers."""

from model.kernels.moe import check_moe_inputs, fused_moe, uses_cuda_kernel
from model.kernels.reference import fused_moe_reference
from model.kernels.routing import softmax_topk
from model.kernels.varlen_gemm import varlen_gemm

__all__ = [
    "check_moe_inputs",
    "fused_moe",
    "fused_moe_reference",
    "softmax_topk",
    "uses_cuda_kernel",
    "varlen_gemm",
]
