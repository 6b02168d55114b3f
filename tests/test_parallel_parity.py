"""2 and 4 gloo ranks give the logits of one rank (float32, within summation-order rounding) on tiny checkpoints
saved by transformers: chunked prefill, a sequence joining mid-way and decode steps, for attention heads split
(K/V heads replicated when ranks outnumber them), vocabulary split (with padding rows), experts split by range, by
columns, or both, Qwen2-MoE's and GLM-4.5's shared experts, GLM's grouped routing (replicated router and correction
bias) and OLMoE's q/k norm across ranks."""

from pathlib import Path

import pytest
import torch

from model.checkpoint import SafetensorsCheckpoint
from model.loader import load_model
from tests.model_fixtures import make_hf_model, save_checkpoint
from tests.parallel_fixtures import parity_target, run_schedule, spawn_ranks

RTOL = 2e-5  # measured 4e-7..8e-7: float32 sums in another order (all-reduce of partial sums)

# (family, expert_parallel) per world size; tensor_parallel = world size.
CASES = {
    2: [("qwen3_moe", 1), ("qwen3_moe", 2), ("qwen2_moe", 2), ("olmoe", 1), ("glm4_moe", 2)],
    4: [("qwen3_moe", 2), ("qwen2_moe", 4), ("olmoe", 2), ("glm4_moe", 1)],  # qwen3 tp4/ep2: 2 ranges x 2 column halves
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {family: save_checkpoint(make_hf_model(family), tmp_path_factory.mktemp(family))
            for family in ("qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe")}


@pytest.fixture(scope="module")
def single_rank(checkpoints) -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(1)
    return {family: run_schedule(load_model(str(path), dtype=torch.float32)[0])
            for family, path in checkpoints.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_give_the_logits_of_one_rank(world, checkpoints, single_rank):
    cases = [(str(checkpoints[family]), world, ep) for family, ep in CASES[world]]
    results = spawn_ranks(world, parity_target, (cases,), timeout=60 * world)
    for (family, ep), case in zip(CASES[world], cases):
        logits = results[0][case]
        assert len(logits) == len(single_rank[family])
        for step, (ours, reference) in enumerate(zip(logits, single_rank[family])):
            assert ours.shape == reference.shape
            error = float((ours - reference).abs().max() / reference.abs().max())
            assert error < RTOL, f"{family} tp={world} ep={ep} step {step}: relative error {error:.2e}"
        total = sum(4 * torch.Size(i.shape).numel() for i in SafetensorsCheckpoint(case[0]).tensors.values())
        for rank in range(1, world):  # each rank read its share, not the checkpoint
            assert results[rank][case] < 0.8 * total, (family, rank, results[rank][case], total)
