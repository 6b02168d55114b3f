"""The MoE benchmark script on the CPU: `--help` as a script, the smoke mode (`--device cpu --quick`, tiny shapes
through the reference path) end to end into a temporary results folder, and its building blocks — routings and the
two peer implementations — checked against independent expectations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_moe
from benchmarks.moe_baselines import grouped_mm_moe, per_expert_loop_moe
from benchmarks.moe_routing import experts_hit, make_ids, make_routing
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
        assert r["tflops"] == pytest.approx(6 * r["T"] * k * H * I / r["ours_ms"] / 1e9)
        assert r["x_gmm"] == pytest.approx(r["gmm_ms"] / r["ours_ms"])
        assert 1 <= r["experts_hit"] <= min(E, r["T"] * k)
    assert {r["scenario"] for r in saved["scenarios"]} == {"balanced", "best", "worst"}
    assert {(r["shape"], r["T"]) for r in saved["fixed_cost"]} == {(s, t) for s in shapes for t in (1, 16)}
    markdown = (tmp_path / files[1]).read_text()
    assert markdown.count("| tiny-") == len(saved["grid"]) + len(saved["fixed_cost"]) + len(saved["scenarios"])
    assert "ERROR" not in capsys.readouterr().out
    assert results["grid"] == saved["grid"]


def test_routings_have_the_promised_shape():
    g = torch.Generator().manual_seed(0)
    T, E, k = 96, 16, 4
    balanced = make_ids("balanced", T, E, k, g, "cpu")
    assert torch.equal(torch.bincount(balanced.flatten().long(), minlength=E), torch.full((E,), T * k // E))
    for kind in ("balanced", "zipf", "same"):
        ids = make_ids(kind, T, E, k, g, "cpu")
        assert ids.dtype == torch.int32 and ids.shape == (T, k)
        assert all(len(set(row)) == k for row in ids.tolist()), f"{kind}: a token repeats an expert"
    same = make_ids("same", T, E, k, g, "cpu")
    assert experts_hit(same, E) == k and (same == same[0]).all()
    zipf = torch.bincount(make_ids("zipf", 4096, 64, 2, g, "cpu").flatten().long(), minlength=64)
    assert zipf.max() > 8 * zipf.float().median(), "zipf routing is not skewed"
    worst = torch.bincount(make_ids("worst", 512, 32, 8, g, "cpu").flatten().long(), minlength=32)
    light = worst.sort().values[:-1]
    assert light.min() >= 1 and light.max() <= 2 and worst.max() == 512 * 8 - light.sum()
    weights, _ = make_routing("zipf", T, E, k, g, "cpu")
    assert (weights > 0).all() and torch.allclose(weights.sum(1), torch.ones(T))


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
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{peer.__name__} on {routing}: relative error {err:.1e}"
