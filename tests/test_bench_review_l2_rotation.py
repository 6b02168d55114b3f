"""benchmarks/moe_cases.expert_rotations: the routings a decode benchmark cycles through so no call finds its
experts' weights in L2 (one graph replayed alone re-reads the same few MB: Qwen3-30B-A3B's 8 FP8 experts at T = 1
are 37.7 MB, under the H100's 50 MB L2)."""

import torch

from benchmarks.moe_cases import expert_rotations, make_routing

L2 = 50 << 20


def fp8_expert_bytes(H, I):
    return 3 * H * I + 4 * (2 * I // 128 * H // 128 + H // 128 * I // 128)


def test_qwen3_fp8_batch1_cycle_reads_four_l2s_of_distinct_experts():
    E, k, H, I = 128, 8, 2048, 768
    gen = torch.Generator().manual_seed(0)
    _, ids = make_routing("balanced", 1, E, k, gen)
    per = fp8_expert_bytes(H, I)
    assert 8 * per < L2  # the case: one call's weights fit in L2
    rot = expert_rotations(ids, E, per, 4 * L2)
    sets = [set(r.flatten().tolist()) for r in rot]
    assert torch.equal(rot[0], ids)
    assert all(len(s) == k for s in sets)
    assert all(not (a & b) for a, b in zip(sets, sets[1:] + sets[:1])), "consecutive calls share an expert"
    assert len(set().union(*sets)) * per >= 4 * L2
    assert len(rot) == -(-4 * L2 // (8 * per))  # no more calls than that takes: 6


def test_row_counts_per_expert_are_kept():
    E, k = 16, 4
    gen = torch.Generator().manual_seed(1)
    _, ids = make_routing("zipf", 6, E, k, gen)
    for r in expert_rotations(ids, E, 1, 10**9):
        assert r.dtype == ids.dtype and r.shape == ids.shape
        counts = sorted(torch.bincount(r.flatten().long(), minlength=E).tolist())
        assert counts == sorted(torch.bincount(ids.flatten().long(), minlength=E).tolist())
        for row in r:  # distinct experts per token stay distinct
            assert len(set(row.tolist())) == k


def test_large_steps_need_no_rotation():
    E, k, H, I = 256, 8, 7168, 2048  # DeepSeek-V3 bf16 T=1: 704 MB, far past L2
    _, ids = make_routing("balanced", 1, E, k, torch.Generator().manual_seed(0))
    assert len(expert_rotations(ids, E, 3 * H * I * 2, 4 * L2)) == 1
