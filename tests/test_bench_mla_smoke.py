"""benchmarks/bench_mla.py on the CPU: the script runs (reference path, tiny shapes), and its byte floor is the
latent cache's bytes over the copy bandwidth it is given."""

import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import bench_mla

REPO = Path(__file__).resolve().parents[1]


def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_mla.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--batch", "--context", "--heads", "--page", "--device"):
        assert flag in proc.stdout


def test_cpu_smoke_prints_a_line_per_point(capsys, tmp_path):
    results = bench_mla.main(["--device", "cpu", "--batch", "1,64", "--json", str(tmp_path / "r.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(results) == len(lines) == 2 and (tmp_path / "r.json").is_file()
    assert all("floor" in line and "reference" in line for line in lines)


def test_byte_floor_is_latent_bytes_over_copy_bandwidth():
    r = bench_mla.bench_mla_decode(batch=2, context=40, heads=4, rank=32, rope=16, page=8, dtype=torch.float32,
                                   device="cpu", copy_gbps=10.0, budget_ms=5)
    assert r["latent_bytes"] == 2 * 40 * (32 + 16) * 4
    assert r["floor_ms"] == r["latent_bytes"] / 10e9 * 1e3
    assert r["reference_ms"] > 0 and "kernel_ms" not in r  # no Triton kernel on the CPU
