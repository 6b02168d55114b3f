"""Python face of the csrc kernels: checked custom ops, pure-torch references, router helpers."""

from model.kernels.fp8 import (
    dequantize_fp8_blocks,
    dequantize_fp8_groups,
    fused_moe_fp8_reference,
    quantize_fp8_blocks,
    quantize_fp8_groups,
)
from model.kernels.fp8_linear import fp8_linear
from model.kernels.moe import check_moe_inputs, fused_moe, uses_cuda_kernel
from model.kernels.reference import fused_moe_reference
from model.kernels.routing import GroupedRouting, fused_linear_route, grouped_topk, softmax_topk, topk_softmax
from model.kernels.varlen_gemm import varlen_gemm

__all__ = [
    "GroupedRouting",
    "check_moe_inputs",
    "dequantize_fp8_blocks",
    "dequantize_fp8_groups",
    "fp8_linear",
    "fused_linear_route",
    "fused_moe",
    "fused_moe_fp8_reference",
    "fused_moe_reference",
    "grouped_topk",
    "quantize_fp8_blocks",
    "quantize_fp8_groups",
    "softmax_topk",
    "topk_softmax",
    "uses_cuda_kernel",
    "varlen_gemm",
]
