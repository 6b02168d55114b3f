"""Single-process tests of the parallel layout and the shard loader: which heads/experts/columns a rank holds, that
each rank's parameters are exactly its slices of the global weights (written out by hand here), that it reads no
more of the checkpoint than that, and that random presets are the same model at any parallelism."""

from pathlib import Path

import pytest
import torch

from model.checkpoint import SafetensorsCheckpoint
from model.families import config_from_hf
from model.loader import init_random_weights, load_model
from model.parallel import ParallelConfig, RankLayout
from model.parallel.config import split_evenly
from model.parallel.loading import init_random_shard, load_shard
from model.parallel.model import build_parallel_model
from model.parallel.sharding import Segment, ShardSpec, regions, split_dim
from model.presets import PRESETS
from tests.model_fixtures import make_hf_model, save_checkpoint


def preset(name: str):
    return config_from_hf(PRESETS[name], name=name)


def test_parallel_config_rejects_what_cannot_be_split():
    with pytest.raises(ValueError, match="must divide"):
        ParallelConfig(tensor_parallel=4, expert_parallel=3)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(tensor_parallel=0)
    assert ParallelConfig(8, 2).expert_tensor_parallel == 4


def test_layout_of_qwen3_30b_on_8_ranks():
    config = preset("qwen3-30b-a3b")  # 32 q heads, 4 kv heads, 128 experts, I=768, V=151936
    layouts = [RankLayout.build(config, ParallelConfig(8, 8), r) for r in range(8)]
    assert [l.q_heads for l in layouts] == [(4 * r, 4 * r + 4) for r in range(8)]
    assert [l.kv_heads for l in layouts] == [(r // 2, r // 2 + 1) for r in range(8)]  # 4 kv heads, each on 2 ranks
    assert all(l.kv_replicas == 2 for l in layouts)
    assert [l.experts for l in layouts] == [(16 * r, 16 * r + 16) for r in range(8)]
    assert all(l.moe_columns == (0, 768) for l in layouts)
    assert layouts[7].vocab == (7 * 18992, 151936) and layouts[0].vocab_rows_per_rank == 18992
    mixed = [RankLayout.build(config, ParallelConfig(8, 2), r) for r in range(8)]
    assert [l.experts for l in mixed] == [(0, 64)] * 4 + [(64, 128)] * 4
    assert [l.moe_columns for l in mixed] == [(192 * i, 192 * i + 192) for i in range(4)] * 2


def test_layout_splits_uneven_experts_and_names_what_does_not_fit():
    config = preset("qwen2-moe-a2.7b")  # 60 experts
    ranges = [RankLayout.build(config, ParallelConfig(8, 8), r).experts for r in range(8)]
    assert [stop - start for start, stop in ranges] == [8, 8, 8, 8, 7, 7, 7, 7]
    assert all(ranges[r][1] == ranges[r + 1][0] for r in range(7)) and ranges[-1][1] == 60
    assert split_evenly(10, 4, 3) == (8, 10)
    with pytest.raises(ValueError, match="multiple of 8"):  # 48 / 4 = 12 columns per rank
        RankLayout.build(preset("qwen3-30b-a3b").replace(moe_intermediate_size=48), ParallelConfig(4, 1), 0)
    with pytest.raises(ValueError, match="num_attention_heads"):
        RankLayout.build(preset("tiny"), ParallelConfig(8, 8), 0)  # 4 heads
    with pytest.raises(ValueError, match="num_key_value_heads"):
        RankLayout.build(preset("qwen3-30b-a3b").replace(num_kv_heads=3, num_heads=24), ParallelConfig(4, 4), 0)


def test_regions_of_a_fused_piece_land_where_the_rank_keeps_them():
    # global [E=4, 2I=8, H=2]; this rank: experts 2..3, columns 1..2 of I=4 (gate rows 1,2 and up rows 5,6)
    spec = ShardSpec((4, 8, 2), (2, 4, 2), {0: (Segment(2, 4, 0),), 1: (Segment(1, 3, 0), Segment(5, 7, 2))})
    # per-expert up_proj of expert 3: index (3, slice(4, 8)), a [4, 2] tensor
    assert regions(spec, (3, slice(4, 8)), (4, 2)) == [((slice(1, 3), slice(0, 2)), (1, slice(2, 4), slice(0, 2)))]
    assert regions(spec, (1, slice(0, 4)), (4, 2)) == []  # expert 1 lives elsewhere
    whole = torch.arange(64.0).view(4, 8, 2)
    local = torch.zeros(2, 4, 2)
    for src, dst in regions(spec, (), (4, 8, 2)):
        local[dst] = whole[src]
    assert torch.equal(local, whole[2:4][:, [1, 2, 5, 6]])


def test_shard_spec_rejects_segments_outside_the_parameter():
    with pytest.raises(ValueError):
        split_dim((10, 4), 0, [(8, 12)])
    assert split_dim((10, 4), 0, [(8, 10)], local_size=3).padded


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(make_hf_model("qwen3_moe"), tmp_path_factory.mktemp("qwen3_moe"))


def _expected_local(full: dict, layout: RankLayout, config) -> dict[str, torch.Tensor]:
    """This rank's slices of the single-rank model's parameters, written out by hand."""
    d, (q0, q1), (k0, k1) = config.head_dim, layout.q_heads, layout.kv_heads
    q, kv = config.num_heads * d, config.num_kv_heads * d
    (e0, e1), (c0, c1), inter = layout.experts, layout.moe_columns, config.moe_intermediate_size
    (v0, v1), rows = layout.vocab, layout.vocab_rows_per_rank
    (m0, m1), dense = layout.dense_columns, config.intermediate_size
    embed = torch.zeros(rows, config.hidden_size)
    embed[: v1 - v0] = full["model.embed_tokens.weight"][v0:v1]
    head = torch.zeros(rows, config.hidden_size)
    head[: v1 - v0] = full["lm_head.weight"][v0:v1]
    expected = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv = full[p + "self_attn.qkv_proj.weight"]
        expected[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [qkv[q0 * d : q1 * d], qkv[q + k0 * d : q + k1 * d], qkv[q + kv + k0 * d : q + kv + k1 * d]])
        expected[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"][:, q0 * d : q1 * d]
        if config.is_moe_layer(i):
            gate_up = full[p + "mlp.experts.gate_up_proj"][e0:e1]
            expected[p + "mlp.experts.gate_up_proj"] = torch.cat(
                [gate_up[:, c0:c1], gate_up[:, inter + c0 : inter + c1]], dim=1)
            expected[p + "mlp.experts.down_proj"] = full[p + "mlp.experts.down_proj"][e0:e1, :, c0:c1]
            expected[p + "mlp.gate.weight"] = full[p + "mlp.gate.weight"]
        else:
            gate_up = full[p + "mlp.gate_up_proj.weight"]
            expected[p + "mlp.gate_up_proj.weight"] = torch.cat([gate_up[m0:m1], gate_up[dense + m0 : dense + m1]])
            expected[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"][:, m0:m1]
    return expected


@pytest.mark.parametrize("tp, ep", [(2, 1), (4, 2), (4, 4)])
def test_each_rank_loads_exactly_its_slices_and_reads_only_them(qwen3_checkpoint, tp, ep):
    full_model, _ = load_model(str(qwen3_checkpoint), dtype=torch.float32)
    full = {name: p for name, p in full_model.named_parameters()}
    checkpoint = SafetensorsCheckpoint(qwen3_checkpoint)
    checkpoint_bytes = sum(4 * torch.Size(info.shape).numel() for info in checkpoint.tensors.values())
    for rank in range(tp):
        layout = RankLayout.build(full_model.config, ParallelConfig(tp, ep), rank)
        model = build_parallel_model(full_model.config, layout, comm=None, dtype=torch.float32, device="cpu")
        stats = load_shard(model, checkpoint)
        local = dict(model.lm.named_parameters())
        expected = _expected_local(full, layout, full_model.config)
        for name, param in local.items():
            want = expected.get(name, full[name])  # anything not listed is replicated
            assert torch.equal(param, want), f"rank {rank}: {name}"
        padding = 4 * full_model.config.hidden_size * (layout.vocab_rows_per_rank - (layout.vocab[1] - layout.vocab[0]))
        local_bytes = sum(4 * p.numel() for p in local.values()) - 2 * padding
        assert stats.bytes_read == local_bytes, "read exactly the rank's own elements, each once"
        assert stats.bytes_read < 0.75 * checkpoint_bytes


def test_random_presets_are_the_same_model_at_any_parallelism():
    config = preset("tiny")
    whole, _ = load_model("tiny", dtype=torch.float32)  # init_random_weights, seed 0
    full = {name: p for name, p in whole.named_parameters()}
    for rank in range(4):
        layout = RankLayout.build(config, ParallelConfig(4, 2), rank)
        model = build_parallel_model(config, layout, comm=None, dtype=torch.float32, device="cpu")
        init_random_shard(model, seed=0)
        expected = _expected_local(full, layout, config)
        for name, param in model.lm.named_parameters():
            assert torch.equal(param, expected.get(name, full[name])), f"rank {rank}: {name}"
    reseeded = load_model("tiny", dtype=torch.float32)[0]
    init_random_weights(reseeded, seed=1)
    assert not torch.equal(reseeded.lm_head.weight, whole.lm_head.weight)  # the seed matters (the test can fail)
