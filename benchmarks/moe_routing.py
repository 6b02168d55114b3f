"""Routings for the MoE benchmark: topk_ids [T, k] int32 and topk_weights [T, k] float32, made on the device.

Grid routings (each token picks k distinct experts): balanced (exact round-robin: every expert gets T·k/E rows),
zipf (expert of popularity rank r drawn ∝ 1/(r+1)^1.2, k distinct per token), same (every token on one set of k
experts). The paper's scenarios add best (= same: each active expert's GEMM has T rows) and worst (one heavy expert
beside every other expert holding one or two rows; a token may then name the heavy expert in several slots, which
the op accepts: each slot counts once).
"""

import torch

GRID_ROUTINGS = ("balanced", "zipf", "same")
ZIPF_EXPONENT = 1.2


def _labels(E: int, gen: torch.Generator, device) -> torch.Tensor:
    """A random relabelling of experts, so popular experts are not always the low ids."""
    return torch.randperm(E, generator=gen, device=device)


def make_ids(kind: str, T: int, E: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    labels = _labels(E, gen, device)
    if kind in ("balanced", "same", "best") and k > E:
        raise ValueError(f"{kind} routing needs k={k} <= E={E}")
    if kind == "balanced":
        flat = torch.arange(T * k, device=device) % E  # consecutive slots of a token: distinct experts
        return labels[flat].view(T, k).to(torch.int32)
    if kind == "zipf":  # k distinct draws without replacement, by Gumbel top-k over log-probabilities
        logp = -ZIPF_EXPONENT * torch.log(torch.arange(1, E + 1, dtype=torch.float32, device=device))
        u = torch.rand(T, E, generator=gen, device=device).clamp_min(1e-20)
        ranks = (logp - torch.log(-torch.log(u))).topk(k, dim=1).indices  # [T, k]
        return labels[ranks].to(torch.int32)
    if kind in ("same", "best"):
        return labels[:k].expand(T, k).contiguous().to(torch.int32)
    if kind == "worst":
        flat = torch.zeros(T * k, dtype=torch.int64, device=device)  # rank 0: the heavy expert
        light = [e for e in range(1, E) for _ in range(1 if e % 2 else 2)]  # 1, 2, 1, 2, ... rows
        if len(light) >= T * k:
            raise ValueError(f"worst case needs T*k > {len(light)} rows, got {T * k}")
        step = (T * k) // len(light) if light else 1  # spread the light rows over the tokens
        positions = torch.arange(len(light), device=device) * step
        flat[positions] = torch.tensor(light, device=device)
        return labels[flat].view(T, k).to(torch.int32)
    raise ValueError(f"unknown routing {kind!r}")


def make_weights(T: int, k: int, gen: torch.Generator, device) -> torch.Tensor:
    w = torch.rand(T, k, generator=gen, device=device) + 0.1  # [T, k]
    return w / w.sum(dim=1, keepdim=True)


def make_routing(kind: str, T: int, E: int, k: int, gen: torch.Generator, device):
    """(topk_weights [T, k] float32, topk_ids [T, k] int32)."""
    return make_weights(T, k, gen, device), make_ids(kind, T, E, k, gen, device)


def experts_hit(topk_ids: torch.Tensor, E: int) -> int:
    """Distinct experts that receive at least one row (one host sync; outside timed regions)."""
    hit = torch.zeros(E, dtype=torch.bool, device=topk_ids.device)
    hit[topk_ids.reshape(-1).long()] = True
    return int(hit.sum())
