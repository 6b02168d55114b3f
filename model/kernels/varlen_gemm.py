"""`varlen_gemm`: a batch of GEMMs where every task has its own M, N and K, in one launch through the generic
static-batching task map (csrc/static_batch/) — the framework's second, non-MoE workload. C_i = A_i · B_iᵀ."""

import numpy as np
import torch

from model.kernels import extension

# Mirrors csrc/static_batch/static_batch.h VarlenGemmTask: three int64 addresses, then m, n, k, pad as int32.
TASK_DTYPE = np.dtype([("a", "<i8"), ("b", "<i8"), ("c", "<i8"), ("m", "<i4"), ("n", "<i4"), ("k", "<i4"), ("pad", "<i4")])


@torch.library.custom_op("staticmoe::varlen_gemm", mutates_args=())
def varlen_gemm(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """a[i] [M_i, K_i], b[i] [N_i, K_i] (bf16, contiguous) -> [M_i, N_i]."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same number of tasks, got {len(a)} and {len(b)}")
    for i, (ai, bi) in enumerate(zip(a, b)):
        if ai.dim() != 2 or bi.dim() != 2 or ai.shape[1] != bi.shape[1]:
            raise ValueError(f"task {i}: need a [M, K] and b [N, K], got {tuple(ai.shape)} and {tuple(bi.shape)}")
        if ai.dtype != bi.dtype or ai.device != bi.device:
            raise ValueError(f"task {i}: a and b differ in dtype or device")
    outs = [ai.new_empty(ai.shape[0], bi.shape[0]) for ai, bi in zip(a, b)]
    if not a:
        return outs
    dev = a[0].device
    if not (extension.available_for(dev) and all(t.dtype == torch.bfloat16 for t in a)):
        return [(ai.float() @ bi.float().t()).to(ai.dtype) for ai, bi in zip(a, b)]
    a = [t.contiguous() for t in a]
    b = [t.contiguous() for t in b]
    tasks = np.zeros(len(a), dtype=TASK_DTYPE)
    for i, (ai, bi, ci) in enumerate(zip(a, b, outs)):
        tasks[i] = (ai.data_ptr(), bi.data_ptr(), ci.data_ptr(), ai.shape[0], bi.shape[0], ai.shape[1], 0)
    tasks_dev = torch.from_numpy(tasks.view(np.uint8)).to(dev, non_blocking=False)
    workspace = torch.empty(extension._C.varlen_gemm_workspace_bytes(len(a)), dtype=torch.uint8, device=dev)
    extension._C.varlen_gemm_bf16(tasks_dev.data_ptr(), len(a), workspace.data_ptr(), dev.index,
                                  torch.cuda.current_stream(dev).cuda_stream)
    return outs


@varlen_gemm.register_fake
def _(a, b):
    return [ai.new_empty(ai.shape[0], bi.shape[0]) for ai, bi in zip(a, b)]
