"""One fused_moe call at a given DeepSeek-V3 size, for Nsight Compute (`ncu ... python3 scripts/probe_ncu_case.py T`)."""

import sys

import torch

from model.kernels import fused_moe

T = int(sys.argv[1])
E, k, H, I = 256, 8, 7168, 2048
torch.manual_seed(0)
w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.int()
fused_moe(x, w13, w2, torch.rand(T, k, device="cuda"), ids)
torch.cuda.synchronize()
