"""The MoE benchmark script on the CPU: `--help` as a script, the smoke mode (`--device cpu --quick`, tiny shapes
through the reference path) end to end into a temporary results folder, and the two peer implementations checked
against a float64 reference (the routings: tests/test_moe_cases.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_moe
from benchmarks.moe_baselines import grouped_mm_moe, per_expert_loop_moe
from benchmarks.moe_cases import make_routing, moe_flops, relative_error
from model.kernels import fused_moe_reference

REPO = Path(__file__).resolve().parents[1]


def test_help_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_moe.py"), "--help"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--shapes", "--tokens", "--routing", "--quick", "--device"):
        assert flag in proc.stdout


def test_smoke_mode_writes_json_and_markdown(tmp_path, capsys):
    results = bench_moe.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("_quick.json") and files[1].endswith("_quick.md"), files
    saved = json.loads((tmp_path / files[0]).read_text())
    assert saved["meta"]["device"].startswith("CPU") and saved["meta"]["torch"] == torch.__version__
    assert saved["meta"]["commit"] and saved["meta"]["date"]
    shapes, tokens, routings = bench_moe.SMOKE_SHAPES, bench_moe.SMOKE_QUICK_TOKENS, ("balanced", "zipf")
    points = {(r["shape"], r["T"], r["routing"]) for r in saved["grid"]}
    assert points == {(s, t, r) for s in shapes for t in tokens for r in routings}
    assert not saved["errors"], saved["errors"]
    for r in saved["grid"]:
        assert "skipped" not in r, r
        assert r["rel_err"] < bench_moe.REL_ERR_FLAG and not r["flagged"], r
        E, k, H, I = shapes[r["shape"]]
        assert r["tflops"] == pytest.approx(moe_flops(r["T"], k, H, I) / r["ours_ms"] / 1e9)
        assert r["x_gmm"] == pytest.approx(r["gmm_ms"] / r["ours_ms"])
        assert 1 <= r["experts_hit"] <= min(E, r["T"] * k)
    assert {r["scenario"] for r in saved["scenarios"]} == {"balanced", "best", "worst"}
    assert {(r["shape"], r["T"]) for r in saved["fixed_cost"]} == {(s, t) for s in shapes for t in (1, 16)}
    markdown = (tmp_path / files[1]).read_text()
    assert markdown.count("| tiny-") == len(saved["grid"]) + len(saved["fixed_cost"]) + len(saved["scenarios"])
    assert "ERROR" not in capsys.readouterr().out
    assert results["grid"] == saved["grid"]


@pytest.mark.parametrize("routing", ["balanced", "zipf", "same", "worst"])
def test_peer_implementations_match_the_reference(routing):
    g = torch.Generator().manual_seed(3)
    T, E, k, H, I = 40, 8, 2, 32, 16
    x = torch.randn(T, H, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    tw, ids = make_routing(routing, T, E, k, g, "cpu")
    ref = fused_moe_reference(x.double(), w13.double(), w2.double(), tw, ids, compute_dtype=torch.float64)
    for peer in (grouped_mm_moe, per_expert_loop_moe):
        out = peer(x, w13, w2, tw, ids)
        assert out.shape == (T, H) and out.dtype == torch.bfloat16
        err = relative_error(out, ref)
        assert err < 2e-2, f"{peer.__name__} on {routing}: relative error {err:.1e}"
