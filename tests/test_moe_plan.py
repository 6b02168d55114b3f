"""Host twin of the device MoE plan (`_C.moe_plan_host`) against a brute-force plan written here in Python.

The expert order rule is re-derived from its documentation in csrc/moe/plan.cu: sort the non-empty experts by M
tiles (descending, ties by lower id first), then take them alternately from the heavy end and the light end
(heaviest, lightest, 2nd heaviest, 2nd lightest, ...); empty experts follow, in id order.
"""

import random

import pytest

from model.kernels import extension
from model.kernels.moe import MAX_EXPERTS

_C = extension._C
pytestmark = pytest.mark.skipif(_C is None, reason="extension not built (test_extension_build covers that)")


def brute_force_plan(ids: list[int], num_experts: int, block_m: int) -> dict:
    rows_of = {e: [] for e in range(num_experts)}
    for flat, e in enumerate(ids):  # flat = token * k + slot, so scanning in order gives (token, slot) ascending
        if 0 <= e < num_experts:
            rows_of[e].append(flat)
    counts = [len(rows_of[e]) for e in range(num_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    sorted_rows = [r for e in range(num_experts) for r in rows_of[e]]
    mtiles = [-(-c // block_m) for c in counts]

    heavy_first = sorted((e for e in range(num_experts) if counts[e]), key=lambda e: (-mtiles[e], e))
    order, lo, hi = [], 0, len(heavy_first) - 1
    while lo <= hi:
        order.append(heavy_first[lo])
        if lo != hi:
            order.append(heavy_first[hi])
        lo, hi = lo + 1, hi - 1
    order += [e for e in range(num_experts) if counts[e] == 0]

    prefix, slot_expert, running = [], [], 0
    for e in order:
        if mtiles[e]:
            running += mtiles[e]
            prefix.append(running)
            slot_expert.append(e)
    return dict(
        expert_counts=counts,
        expert_offsets=offsets,
        sorted_rows=sorted_rows,
        expert_order=order,
        mtile_prefix=prefix,
        slot_expert=slot_expert,
        num_slots=len(slot_expert),
    )


def check_plan(ids: list[int], num_experts: int, block_m: int) -> dict:
    got = _C.moe_plan_host(ids, num_experts, block_m)
    want = brute_force_plan(ids, num_experts, block_m)
    for key in ("expert_counts", "expert_offsets", "sorted_rows", "expert_order", "mtile_prefix", "slot_expert"):
        assert list(got[key]) == want[key], f"{key} differs (E={num_experts}, block_m={block_m}, {len(ids)} ids)"
    assert got["num_slots"] == want["num_slots"]
    order = list(got["expert_order"])
    assert sorted(order) == list(range(num_experts)), "expert_order is not a permutation of the experts"
    return got


def routing(kind: str, T: int, k: int, E: int, rng: random.Random) -> list[int]:
    """Flat topk_ids [T*k]."""
    if kind == "uniform":  # distinct experts per token when possible
        return [e for _ in range(T) for e in (rng.sample(range(E), k) if k <= E else rng.choices(range(E), k=k))]
    if kind == "skewed":  # a few experts take most rows, so tile counts differ and the interleave matters
        weights = [1.0 / (e + 1) ** 1.5 for e in range(E)]
        return rng.choices(range(E), weights=weights, k=T * k)
    if kind == "same":
        chosen = rng.sample(range(E), min(k, E))
        return [chosen[s % len(chosen)] for _ in range(T) for s in range(k)]
    raise ValueError(kind)


@pytest.mark.parametrize("top_k", [1, 2, 6, 8])
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("E", [1, 8, 60, 256, MAX_EXPERTS])
def test_plan_matches_brute_force(top_k, T, E):
    rng = random.Random(hash((top_k, T, E)) % 2**32)
    for kind in ("uniform", "skewed", "same"):
        for block_m in (64, 128):
            check_plan(routing(kind, T, top_k, E, rng), E, block_m)


@pytest.mark.parametrize("block_m", [1, 3, 16])
def test_small_tiles_make_many_distinct_tile_counts(block_m):
    """Tiny tiles turn every count difference into a tile difference: the heavy/light interleave is exercised on
    many distinct weights, with ties broken by expert id."""
    rng = random.Random(block_m)
    for E in (2, 3, 33, 300):
        check_plan(routing("skewed", 257, 4, E, rng), E, block_m)


def test_interleave_puts_heaviest_then_lightest():
    """Hand-made case: tile counts 5, 1, 3, 0, 4, 2 (block_m=1) -> heaviest 0, lightest 1, then 4, 5, then 2."""
    counts = {0: 5, 1: 1, 2: 3, 3: 0, 4: 4, 5: 2}
    ids = [e for e, c in counts.items() for _ in range(c)]
    got = check_plan(ids, 6, 1)
    assert list(got["expert_order"]) == [0, 1, 4, 5, 2, 3]
    assert list(got["mtile_prefix"]) == [5, 6, 10, 12, 15]
    assert got["num_slots"] == 5


def test_ties_keep_lower_expert_id_first():
    ids = [3, 1, 2, 0]  # every expert one row: one tile each
    got = check_plan(ids, 4, 64)
    assert list(got["expert_order"]) == [0, 3, 1, 2]


def test_out_of_range_ids_are_ignored():
    rng = random.Random(5)
    E = 16
    ids = [rng.choice([-7, -1, E, E + 3, 2**31 - 1, rng.randrange(E)]) for _ in range(600)]
    got = check_plan(ids, E, 64)
    valid = [i for i, e in enumerate(ids) if 0 <= e < E]
    assert got["expert_offsets"][-1] == len(valid)
    assert sorted(got["sorted_rows"]) == valid


def test_sorted_rows_are_token_slot_ascending_within_each_expert():
    """Independent of the brute force: decode flat rows back to (token, slot) and check order and membership."""
    rng = random.Random(9)
    T, k, E = 513, 6, 40
    ids = routing("uniform", T, k, E, rng)
    got = check_plan(ids, E, 64)
    offsets, rows = got["expert_offsets"], got["sorted_rows"]
    for e in range(E):
        mine = rows[offsets[e] : offsets[e + 1]]
        pairs = [divmod(r, k) for r in mine]  # (token, slot)
        assert pairs == sorted(pairs)
        assert all(ids[r] == e for r in mine)


def test_launch_config_block_m_gives_a_consistent_plan():
    """The block_m the device would use for a shape yields a task map covering exactly ceil(count/block_m) tiles."""
    rng = random.Random(11)
    for T, k, E in ((1, 8, 128), (513, 2, 8), (4096, 8, 64)):
        block_m, _ = _C.moe_launch_config(T, k, E, 64, 64)
        ids = routing("skewed", T, k, E, rng)
        got = check_plan(ids, E, block_m)
        total_tiles = sum(-(-c // block_m) for c in got["expert_counts"])
        assert (got["mtile_prefix"][-1] if got["num_slots"] else 0) == total_tiles
