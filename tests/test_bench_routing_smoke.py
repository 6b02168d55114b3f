"""The routing/shared-expert benchmark on the CPU: it runs end to end on its tiny shape, writes its record, and its
"appended" variant (shared experts as extra experts of the fused op) computes what the separate pass does."""

import json

from benchmarks import bench_routing


def test_smoke_run_writes_a_record_and_the_appended_variant_is_exact(tmp_path):
    results = bench_routing.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    rows = results["grid"]
    assert [(r["shape"], r["T"]) for r in rows] == [("tiny-grouped", 1), ("tiny-grouped", 16)]
    for r in rows:
        assert r["appended_rel_err"] < 1e-5  # one SwiGLU MLP of n*I columns == n experts of I columns, weight 1
        assert all(r[f"{k}_ms"] > 0 for k in ("route", "topk", "softmax", "experts", "shared", "appended"))
    saved = json.loads(next(tmp_path.iterdir()).read_text())
    assert saved["grid"] == rows and saved["meta"]["device"].startswith("CPU")


def test_appended_routing_gives_every_token_each_shared_expert_with_weight_one():
    import torch

    layer = bench_routing.Layer(bench_routing.SMOKE_SHAPES["tiny-grouped"], torch.device("cpu"), torch.float32,
                                torch.Generator().manual_seed(0))
    weights, ids = layer.route(torch.randn(5, 64))
    w, i = layer.appended_routing(weights, ids)
    assert i.shape == (5, 6) and torch.equal(i[:, 4:], torch.tensor([[16, 17]] * 5, dtype=torch.int32))
    assert torch.equal(w[:, 4:], torch.ones(5, 2)) and torch.equal(w[:, :4], weights)
