"""Shared experts moved into the routed experts op (model/layers/shared_expert_fusion.py): the fused model gives the
unfused model's logits (float32: the same sums in another order), for DeepSeek (ungated, 2 shared experts),
Qwen2-MoE (sigmoid-gated) and GLM-4.5, in bf16 weights and in FP8; blocks that cannot be fused are left alone; the
engine's per-expert metrics count only the routed experts, and its FLOPs keep the shared MLP's."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.layers import shared_expert_fusion
from model.layers.moe import SparseMoeBlock
from model.loader import load_model
from tests.deepseek_fixtures import make_deepseek_model
from tests.model_fixtures import PagedRunner, make_hf_model, save_checkpoint

PROMPTS = {"a": [5, 77, 203, 19, 150, 8, 66, 30], "b": [42, 7, 260, 99, 3]}


def checkpoint(family: str, tmp_path, fp8_blocks: bool = False) -> str:
    """`fp8_blocks`: widths of whole 128-blocks (hidden 128, routed experts 128 wide), so FP8 quantises the experts
    and the shared MLP alike (narrower ones stay high precision or padded, which the fusion leaves alone)."""
    wide = dict(hidden_size=128, moe_intermediate_size=128) if fp8_blocks else {}
    if family == "deepseek":  # V2-Lite's layout: 2 shared experts of the routed width
        hf = make_deepseek_model("v2-lite", seed=3, **wide)
    elif family == "qwen2_moe":  # gated shared MLP of 2 x the routed width
        shared = 2 * wide.get("moe_intermediate_size", 24)
        hf = make_hf_model("qwen2_moe", seed=3, shared_expert_intermediate_size=shared,
                           **({**wide, "moe_intermediate_size": 128} if fp8_blocks else {"moe_intermediate_size": 24}))
    else:  # GLM-4.5: 2 shared experts of the routed width
        hf = make_hf_model(family, seed=3, **wide)
    return str(save_checkpoint(hf, tmp_path / family))


def logits(model) -> dict[str, torch.Tensor]:
    runner = PagedRunner(model, seed=1)
    first = runner.step(PROMPTS, all_logits=True)
    second = runner.step({"a": [11], "b": [12]})  # a decode step after the prefill
    return {**{f"{k}-prefill": v for k, v in first.items()}, **{f"{k}-decode": v for k, v in second.items()}}


def greedy(engine, max_tokens: int) -> dict[str, list[int]]:
    """PROMPTS through the engine, greedy, exactly `max_tokens` each: {request id: tokens}."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS.values()):
        engine.add_request(str(i), prompt, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize("quantization", ["none", "fp8"])
@pytest.mark.parametrize("family,slots", [("deepseek", 2), ("qwen2_moe", 2), ("glm4_moe", 2)])
def test_fused_model_gives_the_unfused_logits(family, slots, quantization, tmp_path):
    source = checkpoint(family, tmp_path, fp8_blocks=quantization == "fp8")
    kwargs = dict(dtype=torch.float32, quantization=quantization)
    plain, _ = load_model(source, **kwargs)
    fused, _ = load_model(source, **kwargs)
    blocks = [m for m in fused.modules() if isinstance(m, SparseMoeBlock)]
    assert shared_expert_fusion.fuse_shared_experts(fused) == len(blocks) > 0
    for block in blocks:
        assert block.shared_expert is None and block.fused_shared_slots == slots
        if quantization == "fp8":
            assert block.experts.gate_up_proj.dtype == torch.float8_e4m3fn
            assert block.experts.gate_up_proj_scale_inv.shape[0] == block.num_experts + slots
        assert block.experts.gate_up_proj.shape[0] == block.num_experts + slots
        assert block.experts.expert_load.shape[0] == block.num_experts + slots
    want, got = logits(plain), logits(fused)
    for key in want:
        scale = want[key].abs().max()
        assert (got[key] - want[key]).abs().max() <= 1e-5 * scale, key


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_unfused_parameters_rebuild_the_original_ones(quantization, tmp_path):
    """What bench_engine hands transformers: every original parameter back, bit for bit, under its own name."""
    source = checkpoint("deepseek", tmp_path, fp8_blocks=quantization == "fp8")
    plain, _ = load_model(source, dtype=torch.float32, quantization=quantization)
    fused, _ = load_model(source, dtype=torch.float32, quantization=quantization)
    assert shared_expert_fusion.fuse_shared_experts(fused) > 0
    want = dict(plain.named_parameters())
    got = dict(shared_expert_fusion.unfused_named_parameters(fused))
    assert sorted(got) == sorted(want)
    assert any(".shared_expert.gate_up_proj.weight_scale_inv" in k for k in got) == (quantization == "fp8")
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_blocks_that_cannot_be_fused_are_left_alone(tmp_path):
    # qwen2_moe's tiny shared MLP (40 columns) is no whole number of routed experts (24)
    model, _ = load_model(str(save_checkpoint(make_hf_model("qwen2_moe", seed=3), tmp_path / "q")), dtype=torch.float32)
    assert shared_expert_fusion.fuse_shared_experts(model) == 0
    assert all(m.shared_expert is not None and m.fused_shared_slots == 0
               for m in model.modules() if isinstance(m, SparseMoeBlock))
    mixtral, _ = load_model(str(save_checkpoint(make_hf_model("mixtral", seed=3), tmp_path / "m")), dtype=torch.float32)
    assert shared_expert_fusion.fuse_shared_experts(mixtral) == 0  # no shared expert at all


def test_engine_with_fusion_matches_without_and_counts_only_routed_experts(tmp_path, monkeypatch):
    source = checkpoint("deepseek", tmp_path)

    def run(fuse: str):
        monkeypatch.setenv("STATICMOE_FUSE_SHARED_EXPERTS", fuse)
        engine = LLMEngine(EngineConfig(model=source, dtype="float32", block_size=4, num_kv_blocks=64,
                                        max_num_seqs=4))
        try:
            tokens = greedy(engine, 6)
            blocks = engine.model.moe_blocks()
            return tokens, engine.moe.read_counts_now(), engine.moe.snapshot(), blocks, engine.moe
        finally:
            engine.shutdown()

    plain_tokens, plain_counts, plain_snap, _, plain_moe = run("0")
    fused_tokens, fused_counts, fused_snap, blocks, fused_moe = run("1")
    assert all(b.fused_shared_slots == 2 for b in blocks)
    assert fused_tokens == plain_tokens
    assert torch.equal(fused_counts, plain_counts)  # [L, E]: routed experts only, the same tokens
    served = sum(len(p) for p in PROMPTS.values()) + sum(len(t) - 1 for t in plain_tokens.values())
    assert fused_counts.sum(dim=1).tolist() == [served * blocks[0].top_k] * len(blocks)
    assert fused_snap.expert_tokens_total == plain_snap.expert_tokens_total  # what /metrics exports, harvested
    assert fused_snap.shared_expert_flops_total == plain_snap.shared_expert_flops_total > 0
    assert fused_snap.flops_total == plain_snap.flops_total
    # the timed op now does the shared MLP's work too: per token and MoE layer, 2·H·2·(S·I) + 2·(S·I)·H more
    b = blocks[0]
    shared = 2 * b.hidden_size * 2 * (2 * b.intermediate_size) + 2 * (2 * b.intermediate_size) * b.hidden_size
    assert fused_moe.timed_flops_per_token == plain_moe.timed_flops_per_token + len(blocks) * shared


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "fp8"])
@pytest.mark.parametrize("family", ["deepseek", "qwen2_moe"])
def test_gpu_kernel_with_fused_shared_experts_within_bf16_error(family, quantization, tmp_path):
    """Our sm_90a experts op with the shared experts appended, against the unfused model on the same GPU and a
    float32 CPU reference: the fused error is no larger than twice the unfused one (bf16 sums in another order)."""
    source = checkpoint(family, tmp_path, fp8_blocks=True)
    reference = logits(load_model(source, dtype=torch.float32, quantization=quantization)[0])
    plain, _ = load_model(source, dtype=torch.bfloat16, device="cuda", quantization=quantization)
    fused, _ = load_model(source, dtype=torch.bfloat16, device="cuda", quantization=quantization)
    assert shared_expert_fusion.fuse_shared_experts(fused) > 0
    want, got = logits(plain), logits(fused)
    for key, ref in reference.items():
        scale = ref.abs().max()
        plain_err = (want[key].float().cpu() - ref).abs().max() / scale
        fused_err = (got[key].float().cpu() - ref).abs().max() / scale
        assert fused_err <= 2 * plain_err + 1e-3, (key, float(fused_err), float(plain_err))


@pytest.mark.gpu
def test_gpu_engine_with_fused_shared_experts_in_cuda_graphs(tmp_path, monkeypatch):
    monkeypatch.setenv("STATICMOE_FUSE_SHARED_EXPERTS", "1")
    engine = LLMEngine(EngineConfig(model=checkpoint("deepseek", tmp_path, fp8_blocks=True), dtype="bfloat16",
                                    block_size=16, num_kv_blocks=64, max_num_seqs=4))
    try:
        assert all(b.fused_shared_slots == 2 for b in engine.model.moe_blocks()) and engine.runner.graphs
        tokens = greedy(engine, 8)
        counts = engine.moe.read_counts_now()
        blocks = engine.model.moe_blocks()
    finally:
        engine.shutdown()
    assert [len(t) for t in tokens.values()] == [8, 8]
    served = sum(len(p) for p in PROMPTS.values()) + 2 * 7  # prompts, then 7 decode steps each
    per_layer = counts.sum(dim=1).tolist()  # routed slots only: k per token (a step launched past a finish may add 2)
    assert len(set(per_layer)) == 1 and per_layer[0] % blocks[0].top_k == 0
    assert served * blocks[0].top_k <= per_layer[0] <= (served + 2) * blocks[0].top_k


def test_glm_4_5_air_in_fp8_fuses_every_layer_without_adding_weight_bytes():
    """The real preset on the meta device (no memory): all 45 MoE layers take their FP8 shared expert in as one
    extra expert of 128x128-block scales, and the model's bytes stay what they were (the fusion moves weights)."""
    def model():
        return load_model("glm-4.5-air", random_weights=True, device="meta", quantization="fp8")[0]

    def weight_bytes(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    fused = model()
    before = weight_bytes(fused)
    assert shared_expert_fusion.fuse_shared_experts(fused) == 45
    assert weight_bytes(fused) == before
    block = fused.moe_blocks()[0]
    assert block.fused_shared_slots == 1 and block.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert tuple(block.experts.gate_up_proj.shape) == (129, 2 * 1408, 4096)
    assert tuple(block.experts.gate_up_proj_scale_inv.shape) == (129, 2 * 1408 // 128, 4096 // 128)
