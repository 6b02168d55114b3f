"""benchmarks/bench_engine.py on the CPU with the tiny model: the whole command writes its JSON, markdown and
summary within its time budget; a run past its deadline stops and says so; the floor's expert count is right."""

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.bench_engine import expected_experts_touched, run_engine
from model.engine import EngineConfig, LLMEngine
from tests.engine_fixtures import one_cpu_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_whole_command_on_cpu_writes_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--presets", "tiny", "--batches", "1", "3",
           "--hf-batches", "1", "3", "--decode-batches", "1", "3", "--input-len", "24", "--output-len", "6",
           "--time-budget", "100", "--out", str(tmp_path)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - started < 100 + 60
    report = json.loads(next(tmp_path.glob("bench_engine_*.json")).read_text())
    tiny = report["presets"]["tiny"]
    for b in ("1", "3"):
        ours = tiny["ours"]["throughput"][b]
        assert ours["output_tokens"] == int(b) * 6 and not ours["truncated"] and ours["max_decode_batch"] == int(b)
        hf = tiny["hf"][b]
        assert hf["output_tokens"] == int(b) * 6 and hf["tok_s"] > 0
        assert tiny["speedup"][b] == pytest.approx(ours["tok_s"] / hf["tok_s"])
        decode = tiny["ours"]["decode"][b]
        assert decode["floor_ms"] > 0 and decode["device_ms"] is None  # no CUDA events on the CPU
    assert tiny["hf_logits_rel_diff"] < 1e-4, "HF does not run on the engine's own weights"
    assert report["wall_seconds"] <= 100
    assert "| 3 |" in next(tmp_path.glob("bench_engine_*.md")).read_text()
    assert "SUMMARY tiny: ours tok/s b1=" in proc.stdout


def test_run_past_deadline_is_aborted_and_marked_truncated():
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=64))
    prompts = [[5, 6, 7, 8]] * 3
    result = run_engine(engine, prompts, 200, "late", deadline=time.perf_counter())
    assert result["truncated"] and result["output_tokens"] < 3 * 200
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == engine.num_kv_blocks
    assert not run_engine(engine, prompts, 5, "on-time")["truncated"]


def test_expected_experts_touched():
    uniform = [10] * 8
    assert expected_experts_touched(uniform, top_k=2, batch=1) == pytest.approx(2.0)  # k distinct experts
    assert expected_experts_touched(uniform, top_k=2, batch=10_000) == pytest.approx(8.0)  # all of them
    assert expected_experts_touched([1, 0, 0, 0], top_k=1, batch=5) == pytest.approx(1.0)  # the only loaded one


def test_fp8_and_bf16_in_one_run_report_both_kv_capacities(tmp_path, monkeypatch):
    """--quantization none fp8: each preset in both precisions, FP8 rows without HF, the FP8 ÷ bf16 table."""
    from benchmarks import bench_engine
    from model.presets import PRESETS

    monkeypatch.setitem(PRESETS, "tiny256", dict(PRESETS["tiny"], hidden_size=256, moe_intermediate_size=128,
                                                 intermediate_size=256, head_dim=64, initializer_range=0.02))
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--presets", "tiny256", "--quantization", "none", "fp8",
                                      "--batches", "2", "--hf-batches", "2", "--decode-batches", "2", "--input-len",
                                      "16", "--output-len", "4", "--time-budget", "120", "--out", str(tmp_path)])
    bench_engine.main()
    report = json.loads(next(tmp_path.glob("bench_engine_*.json")).read_text())
    bf16, fp8 = report["presets"]["tiny256"], report["presets"]["tiny256+fp8"]
    assert bf16["ours"]["experts_precision"] == "float32" and fp8["ours"]["experts_precision"] == "fp8"
    assert fp8["hf"] == {} and bf16["hf"]["2"]["tok_s"] > 0
    assert fp8["ours"]["weight_gib"] < bf16["ours"]["weight_gib"]
    for r in (bf16, fp8):
        assert r["ours"]["kv_capacity_tokens"] == r["ours"]["num_kv_blocks"] * 16
        assert r["ours"]["throughput"]["2"]["output_tokens"] == 8
    markdown = next(tmp_path.glob("bench_engine_*.md")).read_text()
    assert "## FP8 against bf16" in markdown and "| tiny256 | b2 " in markdown


@pytest.mark.parametrize("model_type,fuse", [("deepseek_v2", "1"), ("deepseek_v2", "0"), ("deepseek_v3", "1")])
def test_mla_preset_shares_weights_with_hf_and_reports_both_kv_capacities(tmp_path, monkeypatch, caplog, model_type,
                                                                            fuse):
    """A tiny DeepSeek preset: HF runs on the engine's own weights (its `shared_experts`, rebuilt where the engine
    fused them into the experts, and its correction-bias buffer too), and the report gives the latent cache's
    capacity beside an uncompressed cache's."""
    from model.presets import PRESETS

    monkeypatch.setenv("STATICMOE_FUSE_SHARED_EXPERTS", fuse)

    tiny = dict(model_type=model_type, vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, moe_intermediate_size=32,
                n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                kv_lora_rank=32, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                n_group=2, topk_group=1, topk_method="noaux_tc" if model_type == "deepseek_v3" else "greedy",
                norm_topk_prob=model_type == "deepseek_v3", rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=False, eos_token_id=258, initializer_range=0.2)
    monkeypatch.setitem(PRESETS, "tiny-mla", tiny)
    with caplog.at_level(logging.INFO, logger="model.layers.shared_expert_fusion"):
        report = run_small_preset(monkeypatch, tmp_path, "tiny-mla")
    assert ("shared experts run inside fused_moe" in caplog.text) == (fuse == "1")
    assert report["hf_logits_rel_diff"] < 1e-4, "HF does not run on the engine's own weights"
    ours = report["ours"]
    # latent: 32 + 16 values per token per layer; uncompressed: 4 heads x (16 + 16 + 16)
    assert ours["kv_capacity_uncompressed_tokens"] == ours["kv_capacity_tokens"] * 48 // 192
    assert report["hf"]["2"]["tok_s"] > 0 and ours["throughput"]["2"]["output_tokens"] == 8


def test_gpt_oss_preset_against_hf_on_shared_weights(tmp_path, monkeypatch):
    """A small gpt_oss preset through the engine benchmark: HF's model is built on our weights (gate_up exported
    back to its interleaved layout, router renamed) and its first logits agree with ours."""
    from model.presets import PRESETS

    small = dict(PRESETS["gpt-oss-20b"], vocab_size=259, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"], eos_token_id=258, pad_token_id=None)
    monkeypatch.setitem(PRESETS, "tiny-oss", small)
    report = run_small_preset(monkeypatch, tmp_path, "tiny-oss")
    assert report["hf"]["2"]["tok_s"] > 0
    assert report["hf_logits_rel_diff"] < 1e-4


def run_small_preset(monkeypatch, tmp_path, name: str) -> dict:
    """bench_engine.py on preset `name` (already in PRESETS): batch 2 for us and HF, 16 tokens in, 4 out; its report."""
    from benchmarks import bench_engine

    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--presets", name, "--batches", "2", "--hf-batches", "2",
                                      "--decode-batches", "2", "--input-len", "16", "--output-len", "4",
                                      "--time-budget", "120", "--out", str(tmp_path)])
    bench_engine.main()
    return json.loads(next(tmp_path.glob("bench_engine_*.json")).read_text())["presets"][name]
