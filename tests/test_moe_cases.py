"""benchmarks/moe_cases.py, the MoE problems benchmarks and tests share: routings have the promised shape, the real
shapes match the presets, and its FLOP count equals the one the service's metrics use."""

import pytest
import torch

from benchmarks.moe_cases import (EXPERT_SHAPES, experts_hit, make_ids, make_routing, moe_bytes_touched, moe_flops,
                                  moe_flops_per_token, relative_error)
from model.families import config_from_hf
from model.engine.moe_stats import routed_flops_per_token
from model.layers.moe import SparseMoeBlock
from model.presets import PRESETS


def test_routings_have_the_promised_shape():
    g = torch.Generator().manual_seed(0)
    T, E, k = 96, 16, 4
    balanced = make_ids("balanced", T, E, k, g, "cpu")
    assert torch.equal(torch.bincount(balanced.flatten().long(), minlength=E), torch.full((E,), T * k // E))
    for kind in ("balanced", "uniform", "zipf", "same", "sparse90"):
        ids = make_ids(kind, T, E, k, g, "cpu")
        assert ids.dtype == torch.int32 and ids.shape == (T, k)
        assert all(len(set(row)) == k for row in ids.tolist()), f"{kind}: a token repeats an expert"
    same = make_ids("same", T, E, k, g, "cpu")
    assert experts_hit(same, E) == k and (same == same[0]).all()
    assert experts_hit(make_ids("sparse90", 512, 80, 4, g), 80) == 8
    uniform = torch.bincount(make_ids("uniform", 4096, 8, 2, g).flatten().long(), minlength=8)
    assert uniform.min() > 900 and uniform.max() < 1150 and len(set(uniform.tolist())) > 1, uniform
    zipf = torch.bincount(make_ids("zipf", 4096, 64, 2, g, "cpu").flatten().long(), minlength=64)
    assert zipf.max() > 8 * zipf.float().median(), "zipf routing is not skewed"
    worst = torch.bincount(make_ids("worst", 512, 32, 8, g, "cpu").flatten().long(), minlength=32)
    light = worst.sort().values[:-1]
    assert light.min() >= 1 and light.max() <= 2 and worst.max() == 512 * 8 - light.sum()
    weights, _ = make_routing("zipf", T, E, k, g, "cpu")
    assert (weights > 0).all() and torch.allclose(weights.sum(1), torch.ones(T))
    with pytest.raises(ValueError, match="unknown routing"):
        make_ids("nope", T, E, k, g)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b"])
def test_expert_shapes_match_the_presets(name):
    c = config_from_hf(PRESETS[name], name=name)
    assert EXPERT_SHAPES[name] == (c.num_experts, c.top_k, c.hidden_size, c.moe_intermediate_size)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"tiny"}))
def test_flops_equal_the_metrics_count(name):
    c = config_from_hf(PRESETS[name], name=name)
    with torch.device("meta"):
        block = SparseMoeBlock(0, c.hidden_size, c.num_experts, c.top_k, c.moe_intermediate_size, renormalize=True)
    assert routed_flops_per_token(block) == moe_flops_per_token(c) == moe_flops(1, c.top_k, c.hidden_size,
                                                                                  c.moe_intermediate_size)
    assert moe_flops(7, 2, 4, 3) == 7 * (2 * 2 * 4 * 2 * 3 + 2 * 2 * 3 * 4)


def test_bytes_touched_counts_weights_of_the_experts_hit_and_the_activations():
    E, k, H, I, T, elem = 8, 2, 64, 32, 5, 2
    assert moe_bytes_touched(3, T, k, H, I, elem) == 3 * (2 * I * H + H * I) * elem + 2 * T * H * elem + T * k * 8


def test_relative_error_is_the_norm_ratio_and_keeps_float64_references():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(ref + torch.tensor([0.0, 1e-12], dtype=torch.float64), ref) == pytest.approx(2e-13)
    assert relative_error(torch.tensor([3.0, 5.0]).bfloat16(), ref.float()) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
