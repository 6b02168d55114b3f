"""bench_decode_moe's launch-shape sweep picks the fastest shapes and survives a shape that fails to compile."""

from benchmarks import bench_decode_moe


def test_sweep_reports_the_fastest_shapes_against_the_default(monkeypatch, capsys):
    monkeypatch.setattr(bench_decode_moe, "SWEEP_BLOCK_I", (8, 16))
    monkeypatch.setattr(bench_decode_moe, "SWEEP_BLOCK_H", (4, 8))
    monkeypatch.setattr(bench_decode_moe, "SWEEP_WARPS", (4, 8))
    times = {(8, 4, 4): 30.0, (8, 4, 8): 12.0, (8, 8, 4): 20.0, (8, 8, 8): 25.0,
             (16, 4, 4): 15.0, (16, 4, 8): 40.0, (16, 8, 8): 18.0}  # (16, 8, 4) does not compile

    def run(blocks, warps, tiles):
        if (*blocks, warps) not in times:
            raise RuntimeError("out of resources")
        return times[(*blocks, warps)] * (0.5 if tiles == (1, 2) else 1.0)

    line = bench_decode_moe.sweep(run, default_us=24.0)
    assert "fastest (8, 4, 8) 12.0 us, (16, 4, 4) 15.0 us, (16, 8, 8) 18.0 us" in line
    assert "(2.00x)" in line and "default 24.0 us" in line
    assert "(16, 8, 4): RuntimeError" in capsys.readouterr().out
    line = bench_decode_moe.sweep(run, default_us=24.0, tiles=((4, 8), (1, 2)))
    assert "fastest (8, 4, 8, (1, 2)) 6.0 us, (16, 4, 4, (1, 2)) 7.5 us, (16, 8, 8, (1, 2)) 9.0 us" in line
