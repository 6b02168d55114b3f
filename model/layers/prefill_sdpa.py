"""`prefill_sdpa`: torch's scaled_dot_product_attention for prefill shapes that change every step, with the cuDNN
backend excluded.

On the H100 (torch 2.11, cuDNN 9) SDPA picked cuDNN's attention for MLA's prefill. cuDNN builds, and for these
head widths compiles at run time ("cudnn_generated_..." kernels), one execution plan per input shape, cached by
shape: the first 8192-token step of deepseek-v2-lite took 1210 ms against 100 ms for the same shapes once cached,
and a mixed step with a new batch of chunks 127 ms against 32 (benchmarks/NOTES.md, "Session 18"). A server's
prefill shapes ([chunks, heads, longest chunk, width]) differ from step to step, so that cost would recur.
Flash attention (FA2 in torch) has no per-shape plan; memory-efficient attention serves calls with a mask, which
flash does not take; math is the last resort (and the CPU's). Inputs must be 4-D [B, H, L, D]: with 3-D inputs
torch takes neither fused kernel and runs the math path in float32.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PLAN_FREE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q [B, H, Lq, D], k and v [B, H, Lk, D] -> [B, H, Lq, D], as F.scaled_dot_product_attention."""
    if q.dim() != 4:
        raise ValueError(f"prefill_sdpa takes 4-D [B, H, L, D] inputs (3-D ones fall to the float32 math path), "
                         f"got q of shape {tuple(q.shape)}")
    with sdpa_kernel(PLAN_FREE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
