"""The MoE plan alone, for Nsight Compute and for timing plan variants: `python3 scripts/probe_plan.py T:E[:k] ...`.
Each point runs the device plan 20 times eagerly (ncu profiles those launches), then prints its time per plan in
a CUDA graph of 16 plans, as a model's decode graph holds one per layer."""

import sys

import torch

from benchmarks.bench_timing import graph_ms  # noqa: E402
from benchmarks.moe_cases import make_routing  # noqa: E402

from model.kernels import extension  # noqa: E402

H = I = 128  # the plan does not depend on them beyond the workspace size
for point in sys.argv[1:]:
    T, E, *rest = (int(v) for v in point.split(":"))
    k = rest[0] if rest else 8
    gen = torch.Generator(device="cuda").manual_seed(T * 1000 + E)
    _, ids = make_routing("balanced", T, E, k, gen, torch.device("cuda"))
    ws = extension.moe_workspace(T, k, E, H, I, "cuda").zero_()
    plan = lambda: extension._C.moe_plan_device(  # noqa: E731
        ids.data_ptr(), T, k, E, H, I, ws.data_ptr(), 0, torch.cuda.current_stream().cuda_stream)
    for _ in range(20):
        plan()
    torch.cuda.synchronize()
    print(f"plan T={T} E={E} k={k}: {1e3 * graph_ms(plan, calls=16):.2f} us per plan (x16 graph)", flush=True)
