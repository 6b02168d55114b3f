"""FP8 peers and ceilings of the MoE benchmark, on the same bf16 weights our FP8 op quantises.

- `RowwiseFp8Experts` + `scaled_grouped_mm_moe`: the closest FP8 grouped GEMM torch ships on sm_90,
  `torch._scaled_grouped_mm` with rowwise scales (one per weight row over all of K; one per activation row,
  quantised on the fly), in the same sync-free pipeline as `moe_baselines.grouped_mm_moe`: argsort permute,
  grouped GEMM1, SiLU·up, quantise, grouped GEMM2, scatter back and a weighted sum over the k slots.
- `scaled_mm_ceiling`: `torch._scaled_mm` dense n³ with the DeepSeek block recipe (1x128 activations, 128x128
  weights; cuBLAS on sm_90 with CUDA >= 12.9), falling back to tensorwise scales where that recipe is refused; the
  result says which ran.
"""

import torch
import torch.nn.functional as F

from benchmarks.moe_baselines import expert_counts

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scale [...]) with one scale per row (amax / 448)."""
    scale = x.float().abs().amax(dim=-1).clamp_min(1e-10) / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class RowwiseFp8Experts:
    """w13/w2 quantised per output row, laid out as `_scaled_grouped_mm` wants its 3-D operand (column-major)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13_t, self.w13_scale = self._quantize(w13)  # [E, H, 2I] column-major, [E, 2I]
        self.w2_t, self.w2_scale = self._quantize(w2)  # [E, I, H] column-major, [E, H]

    @staticmethod
    def _quantize(w: torch.Tensor):
        q = torch.empty_like(w, dtype=FP8)
        scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
        for e in range(w.shape[0]):  # one expert at a time: no float32 copy of a whole weight tensor
            q[e], scale[e] = quantize_rowwise(w[e])
        return q.transpose(1, 2), scale


def scaled_grouped_mm_moe(x, experts: RowwiseFp8Experts, topk_weights, topk_ids):
    T, H = x.shape
    k = topk_ids.shape[1]
    inter = experts.w2_t.shape[1]
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat_ids)
    offs = torch.cumsum(expert_counts(flat_ids, experts.w13_t.shape[0]), 0).to(torch.int32)
    xq, xs = quantize_rowwise(x)  # once per token
    rows = order // k
    gate_up = torch._scaled_grouped_mm(xq[rows], experts.w13_t, xs[rows], experts.w13_scale, offs=offs,
                                       out_dtype=torch.bfloat16)  # [N, 2I]
    aq, as_ = quantize_rowwise(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
    ys = torch._scaled_grouped_mm(aq, experts.w2_t, as_, experts.w2_scale, offs=offs,
                                  out_dtype=torch.bfloat16)  # [N, H]
    per_slot = torch.empty_like(ys).index_copy_(0, order, ys).view(T, k, H)
    return torch.bmm(topk_weights.to(x.dtype).unsqueeze(1), per_slot).squeeze(1)  # [T, H]


def scaled_mm_ceiling(timer, n: int) -> dict:
    """FP8 dense n×n×n through torch._scaled_mm: TFLOPS and the scaling recipe that ran."""
    dev = timer.device
    a = torch.randn(n, n, device=dev).to(FP8)  # [M, K] row-major
    b = torch.randn(n, n, device=dev).to(FP8).t()  # [K, N] column-major
    kb, nb = n // 128, n // 128
    sa_rows = torch.rand(n, kb, device=dev).add_(0.5)  # 1x128: one scale per (row, K block)
    sb_blocks = torch.rand(kb, nb, device=dev).add_(0.5)  # 128x128: one scale per (K block, N block)
    recipes = {  # the block recipe in each stride order cuBLAS might want, then the tensorwise fallback
        f"block 1x128 x 128x128 ({la}, {lb})": (sa, sb)
        for la, sa in (("a M-major", sa_rows.t().contiguous().t()), ("a K-major", sa_rows))
        for lb, sb in (("b row-major", sb_blocks), ("b col-major", sb_blocks.t().contiguous().t()))
    }
    recipes["tensorwise"] = (torch.tensor(1.0, device=dev), torch.tensor(1.0, device=dev))
    errors = []
    for name, (sa, sb) in recipes.items():
        fn = lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)  # noqa: E731
        try:
            fn()
            torch.cuda.synchronize(dev)
        except (RuntimeError, NotImplementedError) as err:
            errors.append(f"{name}: {str(err).splitlines()[0][:200]}")
            continue
        ms = timer.median_ms(fn, warmup=2)
        return {"n": n, "recipe": name, "ms": ms, "tflops": 2 * n**3 / ms / 1e9, "refused": errors}
    return {"n": n, "recipe": None, "ms": None, "tflops": None, "refused": errors}


def promotion_error(n_k: int, device) -> dict:
    """What FP8 accumulation inside the tensor cores costs over a long K: `torch._scaled_mm` with
    use_fast_accum=True (WGMMA accumulates all of K itself) against False (partial sums promoted to float32),
    both against float64, on random e4m3 data."""
    a = torch.randn(1024, n_k, device=device).to(FP8)
    b = torch.randn(1024, n_k, device=device).to(FP8)
    ref = a.double() @ b.double().t()
    one = torch.tensor(1.0, device=device)
    out = {}
    for fast in (True, False):
        res = torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.float32, use_fast_accum=fast)
        out["fast_accum" if fast else "promoted"] = ((res.double() - ref).norm() / ref.norm()).item()
    return {"K": n_k, **out}
