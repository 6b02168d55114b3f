"""Time of each fused small op (model/layers/fusion.py) against its eager version, at decode and prefill row
counts (Qwen3-30B-A3B dimensions): is the compiled code slower anywhere?"""

import torch
import triton.testing

from model.layers import fusion
from model.layers.norm import add_rms_norm, rms_norm
from model.layers.rotary import RotaryEmbedding, apply_rotary

H, HQ, HKV, D = 2048, 32, 4, 128
rope = RotaryEmbedding(D, 40960, 1e6).cuda()
w = torch.ones(H, device="cuda", dtype=torch.bfloat16)
wd = torch.ones(D, device="cuda", dtype=torch.bfloat16)


def us(fn):
    return 1e3 * triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")


fusion.set_enabled(True)
fusion.EAGER_MIN_ROWS = 0  # the compiled kernels at every size: this probe compares them with eager ones
for n in (1, 64, 2048, 8192):
    x = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope(torch.randint(0, 4096, (n,), device="cuda"), torch.bfloat16)
    cases = {"rms_norm": (rms_norm, (x, w, 1e-6)), "rms_norm per head": (rms_norm, (q, wd, 1e-6)),
             "add_rms_norm": (add_rms_norm, (x, x, w, 1e-6)), "rotary": (apply_rotary, (q, k, cos, sin))}
    row = []
    for name, (fn, args) in cases.items():
        fn(*args)  # compile outside the timing
        row.append(f"{name} {us(lambda: fn(*args)):.1f} vs eager {us(lambda: fn.eager(*args)):.1f} us")
    print(f"N={n}: " + " | ".join(row), flush=True)
