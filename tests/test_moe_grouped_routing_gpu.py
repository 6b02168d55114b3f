"""On the GPU: group-limited routing at the real models' shapes gives the CPU's result, and a routing captured in a
CUDA graph replays correctly on new logits (no host sync, no data-dependent shapes)."""

import pytest
import torch

from model.kernels import grouped_topk

pytestmark = pytest.mark.gpu

# name: (E, k, scoring, groups, topk_groups, group_score, renormalize, routed_scaling_factor), from the models'
# config.json files
SHAPES = {
    "deepseek_v3": (256, 8, "sigmoid", 8, 4, "top2_sum", True, 2.5),
    "glm_4_5_air": (128, 8, "sigmoid", 1, 1, "top2_sum", True, 1.0),
    "deepseek_v2": (160, 6, "softmax", 8, 3, "max", False, 16.0),
    "deepseek_v2_lite": (64, 6, "softmax", 1, 1, "max", False, 1.0),
}


def route(logits, bias, shape):
    E, k, scoring, groups, topk_groups, group_score, renormalize, scale = shape
    return grouped_topk(logits, k, scoring=scoring, correction_bias=bias if scoring == "sigmoid" else None,
                        num_groups=groups, topk_groups=topk_groups, group_score=group_score,
                        renormalize=renormalize, scaling_factor=scale)


@pytest.mark.parametrize("T", [1, 64, 4096])
@pytest.mark.parametrize("name", SHAPES)
def test_cuda_equals_cpu_on_tie_heavy_logits(name, T):
    """Logits on a grid: exact ties galore (broken to the lower index on both devices), and no two different choices
    equal in exact arithmetic, so float32 rounding differences between the devices' sigmoid/softmax cannot reorder
    experts. Hence logits >= 0 (sigmoid(x) + sigmoid(-x) = 1 would tie two different top-2 group sums) and one bias per
    group (biases varying inside a group tie (s(a) + b1) + (s(c) + b2) with (s(a) + b2) + (s(c) + b1) across groups).
    On this grid distinct choice scores are >= 2.5e-3 apart and distinct top-2 group sums >= 5e-4."""
    shape = SHAPES[name]
    E, groups = shape[0], shape[3]
    gen = torch.Generator().manual_seed(T)
    logits = torch.randint(0, 9, (T, E), generator=gen).float() / 4
    bias = (torch.randperm(groups, generator=gen).float() / 8).repeat_interleave(E // groups)
    cpu_w, cpu_ids = route(logits, bias, shape)
    gpu_w, gpu_ids = route(logits.cuda(), bias.cuda(), shape)
    assert torch.equal(gpu_ids.cpu(), cpu_ids)
    torch.testing.assert_close(gpu_w.cpu(), cpu_w, rtol=1e-5, atol=1e-6)


def clear_of_near_ties(logits, bias, shape, noise=1e-5):
    """[T] bool: tokens whose k-th and k+1-th eligible experts, and last kept and first dropped groups, are apart by
    more than float32 noise in the choice scores (elsewhere a device's rounding may legitimately swap them)."""
    E, k, scoring, groups, topk_groups, group_score = shape[:6]
    scores = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores + (bias if scoring == "sigmoid" else 0.0)  # [T, E]
    clear = torch.ones(logits.shape[0], dtype=torch.bool)
    if topk_groups < groups:
        grouped = choice.view(-1, groups, E // groups)
        group_scores = grouped.amax(-1) if group_score == "max" else grouped.topk(2, -1).values.sum(-1)  # [T, G]
        ranked = group_scores.sort(-1, descending=True).values
        clear &= (ranked[:, topk_groups - 1] - ranked[:, topk_groups]) > noise
    _, wide_ids = route(logits, bias, (E, k + 1, *shape[2:]))  # the k+1 best eligible, best first
    gap = choice.gather(1, wide_ids[:, k - 1 : k].long()) - choice.gather(1, wide_ids[:, k:].long())  # [T, 1]
    return clear & (gap[:, 0] > noise)


@pytest.mark.parametrize("name", SHAPES)
def test_cuda_equals_cpu_on_random_bf16_router_logits(name):
    """Random logits: the same experts wherever no near-tie sits on a boundary, and the same weights."""
    shape = SHAPES[name]
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(2048, shape[0], generator=gen) * 2).to(torch.bfloat16).float()
    bias = torch.randn(shape[0], generator=gen) * 0.05
    cpu_w, cpu_ids = route(logits, bias, shape)
    gpu_w, gpu_ids = route(logits.cuda(), bias.cuda(), shape)
    clear = clear_of_near_ties(logits, bias, shape)
    assert clear.float().mean() > 0.9
    assert torch.equal(gpu_ids.cpu()[clear], cpu_ids[clear])
    torch.testing.assert_close(gpu_w.cpu()[clear], cpu_w[clear], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SHAPES)
def test_routing_replays_in_a_cuda_graph(name):
    shape = SHAPES[name]
    E = shape[0]
    gen = torch.Generator().manual_seed(11)
    static_logits = torch.randn(64, E, generator=gen).cuda()
    bias = (torch.randn(E, generator=gen) * 0.1).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        route(static_logits, bias, shape)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_w, graph_ids = route(static_logits, bias, shape)
    for seed in range(3):
        fresh = torch.randn(64, E, generator=torch.Generator().manual_seed(100 + seed)).cuda()
        static_logits.copy_(fresh)
        graph.replay()
        eager_w, eager_ids = route(fresh, bias, shape)
        assert torch.equal(graph_ids, eager_ids)
        torch.testing.assert_close(graph_w, eager_w, rtol=0, atol=0)
