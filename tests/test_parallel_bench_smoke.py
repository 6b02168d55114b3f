"""benchmarks/bench_parallel.py runs end to end on the CPU (gloo, the tiny preset): the engine mode at 1 and 2
ranks and the collectives mode at 2 ranks write their JSON and markdown with a measurement in every row, so the
script is ready for a multi-GPU machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_parallel.py"


def run(*args: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert (out / (next(out.glob("*.json")).stem + ".md")).read_text().count("\n| ") >= 2
    return report


def test_engine_mode_measures_each_world_size(tmp_path):
    report = run("--preset", "tiny", "--gpus", "1", "2", "--splits", "ep", "--batch", "3", "--input-len", "12",
                 "--output-len", "6", out=tmp_path)
    assert [(r["world"], r["split"]) for r in report["runs"]] == [(1, "—"), (2, "ep")]
    for r in report["runs"]:
        assert "error" not in r, r
        assert r["output_tokens"] == 3 * 6 and r["tok_s"] > 0 and not r["truncated"]


def test_collectives_mode_times_all_three_combines(tmp_path):
    report = run("collectives", "--gpus", "2", "--tokens", "8", "64", "--hidden", "256", out=tmp_path)
    (run_2,) = report["runs"]
    assert run_2["world"] == 2 and run_2["backend"] == "gloo" and set(run_2["tokens"]) == {"8", "64"}
    for row in run_2["tokens"].values():
        assert set(row) == {"all_reduce_us", "reduce_scatter_all_gather_us", "all_to_all_us"}
        assert all(v > 0 for v in row.values())
