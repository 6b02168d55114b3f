"""The tile-clock probe's summary (benchmarks/profile_tile_clocks.py) on stamps written here: the kernels' side
(csrc/common/tile_clocks.cuh) runs only in a probe build on a GPU (`gpu_check.sh tile-clocks`)."""

from benchmarks.profile_tile_clocks import phase_cycles, report


def _tile(start, decode, wait, mainloop, epilogue, starved=0):
    t = [start]
    for span in (decode, wait, mainloop, epilogue):
        t.append(t[-1] + span)
    return t + [starved]


def test_phases_are_medians_over_complete_tiles_and_the_gaps_between_them():
    stamps = [_tile(1000, 10, 100, 6000, 900), _tile(9000, 20, 300, 6200, 1100), _tile(20000, 30, 200, 6100, 1000)]
    stamps.insert(1, [8100, 8110, 0, 0, 0, 0])  # a passed-through tile (empty cluster half): start and decode only
    got = phase_cycles(stamps)
    assert got["decode"] == 15  # median of 10, 10, 20, 30
    assert got["wait for data"] == 200
    assert got["mainloop"] == 6100
    assert got["epilogue"] == 1000
    assert got["tile"] == 7330  # median of 7010, 7620, 7330
    # gaps: tile 0 ends at 8010 and the passed-through tile starts at 8100 (90); the passed-through tile has no end;
    # the second complete tile ends at 16620 and the third starts at 20000 (3380)
    assert got["to next tile"] == (90 + 3380) / 2


def test_report_compares_the_mainloop_per_k_step_with_the_tensor_core_rate():
    # a 128x256 FP8 tile with K = 768: 6 steps of 128x256x128 FMAs = 1024 cycles each at 4096 FMAs per clock
    stamps = [_tile(0, 50, 100, 6 * 2048, 500), _tile(20000, 50, 100, 6 * 2048, 500)]
    text = report("GEMM2", stamps, 6, 128 * 256 * 768, fp8=True)
    assert "2,048 cycles per K step (6 steps) against 1,024" in text and "(50% of it)" in text
    assert "no complete tile" in report("GEMM1", [[5, 6, 0, 0, 0, 0]], 6, 1, fp8=False)


def test_report_gives_the_mainloops_waits_for_data_as_a_share_of_it():
    stamps = [_tile(0, 50, 100, 8000, 500, starved=1000), _tile(10000, 50, 100, 8000, 500, starved=3000),
              _tile(20000, 50, 100, 8000, 500, starved=2000)]
    assert phase_cycles(stamps)["mainloop data waits"] == 2000  # median of the complete tiles' sums
    text = report("GEMM1", stamps, 8, 128 * 256 * 1024, fp8=True)
    assert "waiting for data 2,000 cycles of it (25%)" in text
    assert "mainloop data waits" not in text.splitlines()[0]  # not a phase of the tile: part of the mainloop
