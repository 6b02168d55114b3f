"""benchmarks/bench_moe_epilogue.py on the CPU (tiny shapes, reference path): it runs end to end, writes its JSON
and each point's outputs agree with the float32 reference."""

import json

from benchmarks import bench_moe_epilogue
from benchmarks.moe_cases import GPT_OSS_EXPERT_SHAPES
from model.presets import PRESETS


def test_smoke_run_writes_results(tmp_path, capsys):
    assert bench_moe_epilogue.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench_moe_epilogue_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2 * 2  # two token counts x two routings
    assert all(r["ratio"] > 0 and r["rel_err_swiglu_oai"] < 1e-5 for r in rows)
    assert "swiglu_oai+bias / silu" in capsys.readouterr().out


def test_gpt_oss_shapes_match_the_presets():
    for name, (E, k, H, I) in GPT_OSS_EXPERT_SHAPES.items():
        p = PRESETS[name]
        assert (p["num_local_experts"], p["num_experts_per_tok"], p["hidden_size"], p["intermediate_size"]) == \
            (E, k, H, I)
