"""Host twin of the task-map decoder (csrc/static_batch/task_map.h) against a brute-force map.

The brute force expands every task into its tiles, one record per tile, in slot order; the compressed map (inclusive
prefix over the non-empty tasks + real id per slot) is built here independently of the C++ builder. Every virtual
tile index v must decode to the brute-force record, and v >= total must decode to (-1, -1, -1).
"""

import random

import pytest

from model.kernels import extension

_C = extension._C
pytestmark = pytest.mark.skipif(_C is None, reason="extension not built (test_extension_build covers that)")

PAST_END = (-1, -1, -1)


def compressed_map(tile_counts: list[int]) -> tuple[list[int], list[int]]:
    """(inclusive tile prefix over non-empty tasks, real task id of each slot)."""
    prefix, slot_task, running = [], [], 0
    for task, tiles in enumerate(tile_counts):
        if tiles:
            running += tiles
            prefix.append(running)
            slot_task.append(task)
    return prefix, slot_task


def brute_force_tiles(tile_counts: list[int]) -> list[tuple[int, int, int]]:
    """One (slot, task, tile) record per tile, tasks in id order, empty tasks skipped."""
    records, slot = [], 0
    for task, tiles in enumerate(tile_counts):
        if tiles == 0:
            continue
        records.extend((slot, task, tile) for tile in range(tiles))
        slot += 1
    return records


def check_every_tile(tile_counts: list[int]) -> None:
    """Every v < total decodes to its brute-force record."""
    prefix, slot_task = compressed_map(tile_counts)
    expected = brute_force_tiles(tile_counts)
    assert len(expected) == sum(tile_counts)
    for v, want in enumerate(expected):
        got = _C.task_map_decode_host(prefix, slot_task, v)
        assert tuple(got) == want, f"v={v}: decoded {got}, expected {want} (tile counts {tile_counts[:40]}...)"


def check_past_end(tile_counts: list[int]) -> None:
    """v == total (and beyond) decodes to (-1, -1, -1), whatever the number of non-empty slots."""
    prefix, slot_task = compressed_map(tile_counts)
    total = sum(tile_counts)
    for v in (total, total + 1, total + 1000):
        got = tuple(_C.task_map_decode_host(prefix, slot_task, v))
        assert got == PAST_END, f"v={v} >= total={total} with {len(prefix)} non-empty slots decoded to {got}"


def test_all_tasks_empty():
    for n in (0, 1, 31, 32, 33, 1024):
        check_every_tile([0] * n)
        check_past_end([0] * n)


@pytest.mark.parametrize("num_slots", [1, 2, 5, 31, 32, 33, 64, 100, 1024])
def test_past_the_end_decodes_to_minus_one(num_slots):
    """A slot count that is not a multiple of 32 leaves lanes of the last chunk unset: past the end they must not
    be read as slot `num_slots` (out of bounds of slot_task)."""
    check_past_end([2] * num_slots)
    check_past_end([0, 3] * num_slots)


def test_one_task():
    for tiles in (1, 2, 7, 129):
        check_every_tile([tiles])


def test_one_huge_task_among_thousands_of_empty_ones():
    for where in (0, 1777, 4095):
        counts = [0] * 4096
        counts[where] = 50_000
        check_every_tile(counts)


def test_1024_tasks_all_non_empty():
    rng = random.Random(1)
    check_every_tile([rng.randint(1, 6) for _ in range(1024)])


def test_1024_tasks_of_one_tile_each():
    check_every_tile([1] * 1024)


@pytest.mark.parametrize("num_slots", [31, 32, 33, 63, 64, 65, 96, 97])
def test_slot_counts_around_warp_chunk_boundaries(num_slots):
    """The decoder scans prefixes 32 at a time: a slot count at, just below or just above a multiple of 32."""
    rng = random.Random(num_slots)
    check_every_tile([rng.randint(1, 3) for _ in range(num_slots)])


@pytest.mark.parametrize("seed", range(8))
def test_random_sparse_task_lists(seed):
    rng = random.Random(100 + seed)
    n = rng.choice([5, 100, 1024, 3000])
    density = rng.choice([0.01, 0.1, 0.5, 0.9])
    counts = [rng.randint(1, 40) if rng.random() < density else 0 for _ in range(n)]
    check_every_tile(counts)


def test_first_and_last_tile_of_every_slot_with_heavy_and_light_tasks():
    """Mixed magnitudes (1 tile beside 10,000): the boundaries of each slot are where an off-by-one would show."""
    rng = random.Random(7)
    counts = [rng.choice([0, 0, 1, 2, 10_000]) for _ in range(200)]
    prefix, slot_task = compressed_map(counts)
    start = 0
    for slot, (end, task) in enumerate(zip(prefix, slot_task)):
        for v, tile in ((start, 0), (end - 1, end - 1 - start)):
            assert tuple(_C.task_map_decode_host(prefix, slot_task, v)) == (slot, task, tile)
        start = end
