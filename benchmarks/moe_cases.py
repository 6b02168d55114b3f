"""The MoE layer problems that benchmarks and tests share: real models' expert shapes, routings, and how a run is
scored (FLOPs, bytes, relative error).

Routings (topk_ids [T, k] int32, topk_weights [T, k] float32, made on the generator's device):
- balanced: exact round-robin, every expert gets T·k/E rows;
- uniform: k distinct experts per token drawn uniformly (counts vary around T·k/E: ragged last tiles);
- zipf: the expert of popularity rank r drawn ∝ 1/(r+1)^1.2, k distinct per token;
- same / best: every token on one set of k experts (each active expert's GEMM has T rows);
- sparse90: k distinct experts per token out of a random ~10% of the experts;
- worst: one heavy expert beside every other expert holding one or two rows (a token may then name the heavy expert
  in several slots, which the op accepts: each slot counts once).
Popular experts are relabelled at random, so they are not always the low ids.

The service counts its FLOPs on its own (model/engine/moe_stats.py); tests/test_moe_cases.py holds the two equal.
"""

import torch

EXPERT_SHAPES = {  # name: (E experts, k per token, H hidden, I expert intermediate)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "deepseek-v3": (256, 8, 7168, 2048),
}
# The FP8 checkpoints users serve on Hopper (DeepSeek-V3/R1, Qwen3-FP8, Mixtral quantised): issue 16's grid.
FP8_EXPERT_SHAPES = {
    "deepseek-v3": EXPERT_SHAPES["deepseek-v3"],
    "qwen3-30b-a3b": EXPERT_SHAPES["qwen3-30b-a3b"],
    "qwen3-235b-a22b": (128, 8, 4096, 1536),
    "mixtral-8x7b": EXPERT_SHAPES["mixtral-8x7b"],
}
# gpt-oss (openai/gpt-oss-20b, -120b config.json): H = I = 2880, a multiple of 8 (the bf16 path) but not of 128 (the
# FP8 path refuses it). Run with the `swiglu_oai` activation and both expert biases, against SiLU without biases at the
# same shape: `swiglu_oai_case` (tests/test_kernels_gpu_swiglu_oai.py, benchmarks/bench_moe_epilogue.py).
GPT_OSS_EXPERT_SHAPES = {
    "gpt-oss-20b": (32, 4, 2880, 2880),
    "gpt-oss-120b": (128, 4, 2880, 2880),
}
ROUTINGS = ("balanced", "uniform", "zipf", "same", "best", "sparse90", "worst")
ZIPF_EXPONENT = 1.2


def make_ids(kind: str, T: int, E: int, k: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """topk_ids [T, k] int32 of routing `kind` (see the module docstring)."""
    device = gen.device if device is None else device
    labels = torch.randperm(E, generator=gen, device=device)
    if kind in ("balanced", "uniform", "same", "best", "sparse90") and k > E:
        raise ValueError(f"{kind} routing needs k={k} <= E={E}")
    if kind == "balanced":
        flat = torch.arange(T * k, device=device) % E  # consecutive slots of a token: distinct experts
        return labels[flat].view(T, k).to(torch.int32)
    if kind == "uniform":
        return torch.rand(T, E, generator=gen, device=device).topk(k, dim=1).indices.to(torch.int32)
    if kind == "zipf":  # k distinct draws without replacement, by Gumbel top-k over log-probabilities
        logp = -ZIPF_EXPONENT * torch.log(torch.arange(1, E + 1, dtype=torch.float32, device=device))
        u = torch.rand(T, E, generator=gen, device=device).clamp_min(1e-20)
        ranks = (logp - torch.log(-torch.log(u))).topk(k, dim=1).indices  # [T, k]
        return labels[ranks].to(torch.int32)
    if kind in ("same", "best"):
        return labels[:k].expand(T, k).contiguous().to(torch.int32)
    if kind == "sparse90":
        live = labels[: max(k, E // 10)]
        picks = torch.rand(T, live.numel(), generator=gen, device=device).topk(k, dim=1).indices  # [T, k]
        return live[picks].to(torch.int32)
    if kind == "worst":
        flat = torch.zeros(T * k, dtype=torch.int64, device=device)  # rank 0: the heavy expert
        light = [e for e in range(1, E) for _ in range(1 if e % 2 else 2)]  # 1, 2, 1, 2, ... rows
        if len(light) >= T * k:
            raise ValueError(f"worst case needs T*k > {len(light)} rows, got {T * k}")
        step = (T * k) // len(light) if light else 1  # spread the light rows over the tokens
        positions = torch.arange(len(light), device=device) * step
        flat[positions] = torch.tensor(light, device=device)
        return labels[flat].view(T, k).to(torch.int32)
    raise ValueError(f"unknown routing {kind!r}; choose from {ROUTINGS}")


def make_weights(T: int, k: int, gen: torch.Generator, device=None) -> torch.Tensor:
    """Positive routing weights [T, k] float32, each row summing to 1."""
    w = torch.rand(T, k, generator=gen, device=gen.device if device is None else device) + 0.1
    return w / w.sum(dim=1, keepdim=True)


def make_routing(kind: str, T: int, E: int, k: int, gen: torch.Generator, device=None):
    """(topk_weights [T, k] float32, topk_ids [T, k] int32)."""
    return make_weights(T, k, gen, device), make_ids(kind, T, E, k, gen, device)


def experts_hit(topk_ids: torch.Tensor, E: int) -> int:
    """Distinct experts that receive at least one row (one host sync; outside timed regions)."""
    hit = torch.zeros(E, dtype=torch.bool, device=topk_ids.device)
    hit[topk_ids.reshape(-1).long()] = True
    return int(hit.sum())


def moe_flops(T: int, k: int, H: int, I: int) -> int:
    """Routed-expert GEMM FLOPs of T tokens: 2·T·k·H·2I (gate and up) + 2·T·k·I·H (down)."""
    return 2 * T * k * H * 2 * I + 2 * T * k * I * H


def moe_flops_per_token(config) -> int:
    """moe_flops of one token in one MoE layer, from a model config."""
    return moe_flops(1, config.top_k, config.hidden_size, config.moe_intermediate_size)


def expert_weight_bytes(H: int, I: int, elem: int) -> int:
    """Bytes of one expert's w13 [2I, H] and w2 [H, I]."""
    return 3 * H * I * elem


def moe_bytes_touched(experts: int, T: int, k: int, H: int, I: int, elem: int) -> int:
    """Least bytes a layer moves: the weights of the experts hit, x and out [T, H], ids and weights [T, k]."""
    return experts * expert_weight_bytes(H, I, elem) + 2 * T * H * elem + T * k * 8


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (Frobenius), in float32, or float64 when the reference is float64."""
    dtype = torch.promote_types(ref.dtype, torch.float32)
    ref = ref.to(dtype)
    return ((out.to(dtype) - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def swiglu_oai_case(E: int, H: int, I: int, gen: torch.Generator, dtype=torch.bfloat16, device=None,
                    gate_scale: float = 3.0) -> dict:
    """Weights and biases of a gpt-oss-like expert layer: w13 [E, 2I, H], w2 [E, H, I], w13_bias [E, 2I],
    w2_bias [E, H]. `gate_scale` widens GEMM1's outputs (std ~gate_scale for x ~ N(0, 1)) so a share of the gate and
    up values lies past the clamp limit of 7, as in the trained model's larger activations."""
    device = gen.device if device is None else device
    w13 = torch.randn(E, 2 * I, H, generator=gen, device=device) * (gate_scale / H**0.5)
    w2 = torch.randn(E, H, I, generator=gen, device=device) / I**0.5
    b13 = torch.randn(E, 2 * I, generator=gen, device=device)
    b2 = 0.1 * torch.randn(E, H, generator=gen, device=device)
    return dict(w13=w13.to(dtype), w2=w2.to(dtype), w13_bias=b13.to(dtype), w2_bias=b2.to(dtype))


def expert_rotations(topk_ids: torch.Tensor, E: int, bytes_per_expert: int, min_bytes: int) -> list[torch.Tensor]:
    """Copies of `topk_ids` [T, k] whose expert sets are disjoint from one call to the next (the same rows per
    expert, relabelled onto the next experts in turn), as many as it takes for one cycle to read `min_bytes` of
    expert weights, at most E // hit of them. Timing one cycle of them (as a model's layers each read their own
    weights) keeps a small step's weights from being found in L2 by the next call; the first copy is `topk_ids`."""
    used = torch.unique(topk_ids.reshape(-1).long())
    hit = used.numel()
    calls = max(1, min(E // max(hit, 1), -(-min_bytes // max(hit * bytes_per_expert, 1))))
    mask = torch.ones(E, dtype=torch.bool, device=topk_ids.device)
    mask[used] = False
    order = torch.cat([used, torch.arange(E, device=topk_ids.device)[mask]])  # the hit experts first
    out = []
    for j in range(calls):
        relabel = torch.empty(E, dtype=torch.long, device=topk_ids.device)
        relabel[order] = order.roll(-j * hit)  # hit expert i -> order[i + j·hit]
        out.append(relabel[topk_ids.long()].to(topk_ids.dtype))
    return out
