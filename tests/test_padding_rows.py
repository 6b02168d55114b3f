"""A CUDA graph's padding rows route to no expert (model/layers/padding_rows.py): the MoE block's real rows are what
they are without padding, the padding rows get only the shared expert, and no expert counter counts them."""

import pytest
import torch

from model.layers.moe import SparseMoeBlock
from model.layers.padding_rows import padding_rows, route_padding_nowhere
from model.parallel.expert_parallel import ShardedExperts


def test_marked_rows_route_nowhere_only_inside_the_context():
    ids = torch.tensor([[3, 1], [0, 2], [5, 4]], dtype=torch.int32)
    assert route_padding_nowhere(ids) is ids
    mask = torch.tensor([False, True, True, True])  # 4 rows of buffer, 3 routed
    with padding_rows(mask):
        assert route_padding_nowhere(ids).tolist() == [[3, 1], [-1, -1], [-1, -1]]
        with padding_rows(torch.zeros(3, dtype=torch.bool)):  # the innermost mask wins
            assert route_padding_nowhere(ids).tolist() == ids.tolist()
    assert route_padding_nowhere(ids) is ids  # left: nothing masked any more
    assert ids.tolist() == [[3, 1], [0, 2], [5, 4]]  # the router's tensor is not written


@torch.no_grad()
def test_an_id_of_minus_one_is_a_router_bug_outside_a_padding_mask():
    """The experts op takes -1 (routed nowhere) only while a padding mask is active; elsewhere on the CPU an id
    outside [0, E) still raises, so a broken router is not silently dropped."""
    block = SparseMoeBlock(0, hidden_size=32, num_experts=8, top_k=2, intermediate_size=16, renormalize=True)
    for p in block.parameters():
        p.normal_(0, 0.2)
    x, weights = torch.randn(2, 32), torch.rand(2, 2)
    ids = torch.tensor([[1, 2], [-1, -1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="expert"):
        block.experts(x, weights, ids)
    with padding_rows(torch.tensor([False, True])):
        out = block.experts(x, weights, ids)
    assert torch.equal(out[1], torch.zeros(32)) and block.experts.expert_load.sum() == 2


def test_bad_masks_are_refused():
    with pytest.raises(ValueError, match="1-D bool"):
        with padding_rows(torch.zeros(4, dtype=torch.int32)):
            pass
    with pytest.raises(ValueError, match="1-D bool"):
        with padding_rows(torch.zeros(4, 1, dtype=torch.bool)):
            pass
    with padding_rows(torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="3 rows routed under a padding mask of 2 rows"):
            route_padding_nowhere(torch.zeros(3, 2, dtype=torch.int32))


@pytest.mark.parametrize("shared", [0, 24])
@torch.no_grad()
def test_moe_block_padding_rows_cost_no_expert_and_are_not_counted(shared):
    torch.manual_seed(3)
    block = SparseMoeBlock(0, hidden_size=32, num_experts=8, top_k=2, intermediate_size=16, renormalize=True,
                           shared_expert_intermediate_size=shared)
    for p in block.parameters():
        p.normal_(0, 0.2)
    x = torch.randn(6, 32)
    real = 4
    solo = block(x[:real]).clone()
    solo_load = block.experts.expert_load.clone()
    _, solo_ids = block.route(x[:real])
    assert torch.equal(solo_load, torch.bincount(solo_ids.reshape(-1).long(), minlength=8))
    block.experts.expert_load.zero_()
    is_padding = torch.arange(8) >= real  # a buffer longer than the step, as the graphs' are
    with padding_rows(is_padding):
        out = block(x)
    torch.testing.assert_close(out[:real], solo, rtol=1e-5, atol=1e-6)
    pad_only = block.shared_expert(x[real:]) if shared else torch.zeros(2, 32)
    if shared:
        pad_only = torch.sigmoid(block.shared_expert_gate(x[real:])) * pad_only
    torch.testing.assert_close(out[real:], pad_only, rtol=1e-5, atol=1e-6)
    assert torch.equal(block.experts.expert_load, solo_load)


@torch.no_grad()
def test_expert_parallel_rank_counts_only_routed_slots():
    """An expert-parallel rank counts the replicated routing whole; slots of padding rows (-1) are not counted."""
    torch.manual_seed(5)
    experts = ShardedExperts(8, 32, experts=(0, 4), columns=(0, 16))
    for p in experts.parameters():
        p.normal_(0, 0.2)
    ids = torch.tensor([[1, 6], [7, 2], [-1, -1]], dtype=torch.int32)
    weights = torch.rand(3, 2)
    out = experts(torch.randn(3, 32), weights, ids)
    assert experts.expert_load.tolist() == [0, 1, 1, 0, 0, 0, 1, 1]
    assert torch.equal(out[2], torch.zeros(32))  # routed nowhere: no expert output
