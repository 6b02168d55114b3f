#!/usr/bin/env python
"""Which block-scaled `torch._scaled_mm` calls this torch/cuBLAS takes on this GPU (the fast path of
model/kernels/fp8_linear.py): the DeepSeek recipe (1x128 activation scales x 128x128 weight scales) over a few M
and scale layouts, each printed as ok (with its error against the dequantised reference) or the error cuBLAS gave.
Rerun after a torch upgrade: where a variant passes, `block_scaled_mm_supported` can probe with its layout.

    python benchmarks/probe_scaled_mm.py
"""

import torch

from model.kernels.fp8 import quantize_fp8_blocks, quantize_fp8_groups
from model.kernels.fp8_linear import fp8_linear_reference


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in [(17, 256, 256), (128, 256, 256), (256, 1024, 512), (1, 2048, 5120)]:
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        wq, ws = quantize_fp8_blocks(torch.randn(n, k, generator=gen, device="cuda"))
        xq, xs = quantize_fp8_groups(x)  # [M, K/128]
        want = fp8_linear_reference(x.float(), wq, ws)
        variants = {
            "a-scales M-major, b-scales transposed view": (xs.t().contiguous().t(), ws.t()),
            "a-scales row-major, b-scales transposed view": (xs, ws.t()),
            "a-scales M-major, b-scales contiguous transpose": (xs.t().contiguous().t(), ws.t().contiguous()),
            "a-scales row-major, b-scales contiguous transpose": (xs, ws.t().contiguous()),
        }
        for name, (sa, sb) in variants.items():
            try:
                got = torch._scaled_mm(xq, wq.t(), sa, sb, out_dtype=torch.bfloat16).float()
                torch.cuda.synchronize()
                err = float((got - want).abs().max() / want.abs().max())
                print(f"M={m} K={k} N={n} {name}: ok, rel err {err:.2e}")
            except (RuntimeError, ValueError, NotImplementedError) as e:
                print(f"M={m} K={k} N={n} {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
