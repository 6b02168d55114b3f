"""Sliding-window models through the engine with KV blocks behind the window released (model/kv_groups.py,
model/engine/block_manager.py): gpt-oss (sliding and full layers alternate: two KV-cache groups sharing storage
slots) and Mixtral with a window (one sliding group). Greedy output stays HF transformers' `generate` for sequences
many windows long, with prefix caching on and off, under chunked prefill and preemption, while a sequence's
sliding group holds at most ceil(window / block_size) + 1 blocks between steps."""

import random

import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.block_manager import blocks_for
from tests.engine_fixtures import GREEDY, EagerGraph, engine_with_stand_in_graphs, run, tokens_of
from tests.model_fixtures import hf_greedy, make_hf_model, save_checkpoint

WINDOW, BS = 8, 4
NEW_TOKENS = 40


@pytest.fixture(scope="module", params=["gpt_oss", "mixtral"])
def checkpoint(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=41, sliding_window=WINDOW)
    return request.param, hf, save_checkpoint(hf, tmp_path_factory.mktemp(request.param))


def requests_for(seed: int) -> dict:
    rng = random.Random(seed)
    shared = [rng.randrange(300) for _ in range(18)]  # a prefix several requests share (prefix cache hits)
    prompts = [shared + [rng.randrange(300) for _ in range(n)] for n in (3, 11)]
    prompts += [[rng.randrange(300) for _ in range(n)] for n in (30, 6)]
    return {f"q{i}": (p, SamplingParams(max_tokens=NEW_TOKENS, **GREEDY)) for i, p in enumerate(prompts)}


def engine_for(directory, caching: bool, num_kv_blocks: int = 200) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=BS, num_kv_blocks=num_kv_blocks,
                                  max_num_batched_tokens=10, max_num_seqs=4, enable_prefix_caching=caching))


def check_held_blocks(engine: LLMEngine, seen: list) -> None:
    """After each step (its sliding blocks released): the sliding group holds the window's blocks at most; a full
    group holds every block of the sequence."""
    bm = engine.block_manager
    for seq in engine.scheduler.running:
        for g, window in enumerate(bm.windows):
            held = bm.num_held_blocks(seq, g)
            if window is None:
                assert held == len(seq.block_table)
            else:
                assert held <= -(-window // BS) + 1, (seq, g, seq.block_tables[g])
                seen.append((seq.num_computed_tokens, held))


def test_greedy_matches_generate_with_blocks_released_and_prefix_caching_on_and_off(checkpoint):
    family, hf, directory = checkpoint
    requests = requests_for(5)
    expected = {rid: hf_greedy(hf, prompt, NEW_TOKENS) for rid, (prompt, _) in requests.items()}
    for caching in (False, True):
        engine = engine_for(directory, caching)
        assert engine.block_manager.windows == ((None, WINDOW) if family == "gpt_oss" else (WINDOW,))
        seen = []
        outputs = run(engine, requests, on_step=lambda _, e: check_held_blocks(e, seen))
        assert {rid: tokens_of(outs) for rid, outs in outputs.items()} == expected, f"prefix caching {caching}"
        assert max(c for c, _ in seen) >= 4 * WINDOW, "sequences were meant to be several windows long"
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "blocks leaked"
        if caching:  # the same requests again: hits on the first run's blocks, same tokens
            again = run(engine, {f"again-{rid}": r for rid, r in requests.items()})
            assert {rid.removeprefix("again-"): tokens_of(outs) for rid, outs in again.items()} == expected
            assert engine.stats().prefix_cache_hits_total > 0


def test_a_long_sequence_holds_a_window_of_sliding_blocks_and_fits_a_cache_that_would_not_hold_it(checkpoint):
    """A 110-token sequence (and a 32-token one) in 40 blocks of 4. Without release, gpt-oss (2 groups) would need
    2 x 28 = 56 blocks for the long one alone; with it 28 + at most 6. Mixtral (no full group) holds at most a
    window's blocks per sequence, 6 while a 10-token chunk is computed."""
    family, hf, directory = checkpoint
    rng = random.Random(9)
    prompt = [rng.randrange(300) for _ in range(30)]
    other = [rng.randrange(300) for _ in range(12)]
    requests = {"long": (prompt, SamplingParams(max_tokens=80, **GREEDY)),
                "other": (other, SamplingParams(max_tokens=20, **GREEDY))}
    engine = engine_for(directory, caching=True, num_kv_blocks=40)
    peak = []

    def on_step(_, e):
        check_held_blocks(e, [])
        peak.append(e.block_manager.num_blocks - e.block_manager.num_free_blocks)

    outputs = run(engine, requests, on_step=on_step)
    assert tokens_of(outputs["long"]) == hf_greedy(hf, prompt, 80)
    assert tokens_of(outputs["other"]) == hf_greedy(hf, other, 20)
    assert engine.stats().num_preemptions_total == 0
    if family == "gpt_oss":
        assert 2 * blocks_for(110, BS) > engine.block_manager.num_blocks
        assert max(peak) >= blocks_for(110, BS)  # the full group keeps everything
    else:
        assert max(peak) <= 2 * (blocks_for(WINDOW - 1 + 10, BS) + 1)


def test_static_decode_batches_carry_each_groups_tables_and_padding_is_not_counted(checkpoint):
    """Decode steps through the graph path (stand-ins): its buffers hold every group's block tables and slots as
    the block manager has them (padding rows: each group's own padding block), the output is HF's, and padding rows
    add nothing to the expert counters (each group's padding block keeps its own layers' padding K/V)."""
    family, hf, directory = checkpoint
    engine, _, _ = engine_with_stand_in_graphs(
        lambda e, key, batch, logits: EagerGraph(e.runner, batch, logits),
        model=str(directory), dtype="float32", block_size=BS, num_kv_blocks=200, max_num_batched_tokens=10,
        max_num_seqs=4, moe_timing_every=1000, async_scheduling=False)
    runner, groups, checked = engine.runner, engine.block_manager.num_groups, []
    replay = runner._replay

    def replay_and_check(g, out, sampled_before=None):
        logits = replay(g, out, sampled_before)
        b, w = g.batch.block_tables.shape
        seqs = [s.seq for s in out.scheduled]
        for group in range(groups):
            tables = g.batch.of_group(group).block_tables.tolist()
            slots = g.batch.of_group(group).slot_mapping.tolist()
            for row, seq in enumerate(seqs):
                table = seq.block_tables[group]
                assert tables[row] == table + [0] * (w - len(table))
                p = seq.num_tokens - 1
                assert slots[row] == table[p // BS] * BS + p % BS and table[p // BS] >= groups
            assert all(t == [group] * w for t in tables[len(seqs):]) and all(s == -1 for s in slots[len(seqs):])
        checked.append((b, len(seqs)))
        return logits

    runner._replay = replay_and_check
    requests = requests_for(6)
    outputs = run(engine, requests, arrivals={0: ["q0", "q2"], 2: ["q1", "q3"]})
    for rid, (prompt, params) in requests.items():
        assert tokens_of(outputs[rid]) == hf_greedy(hf, prompt, params.max_tokens), rid
    assert any(real < b for b, real in checked), "no padded replay"
    fed = sum(len(p) + params.max_tokens - 1 for p, params in requests.values())
    fed -= engine.stats().prefix_cache_hits_total  # tokens a cached prefix spared
    totals = [sum(layer) for layer in engine.moe_stats().expert_tokens_total]
    assert totals == [fed * engine.model_config.top_k] * len(totals), (totals, fed)


def test_a_warm_up_batch_of_padding_rows_leaves_every_groups_padding_block_as_it_was(checkpoint):
    """CUDA-graph capture first runs the static batch with padding rows only: each group's layers may write only
    their own padding block (the padding token's K/V, already there), never another group's in a shared slot."""
    import torch

    from model.engine.decode_inputs import static_decode_batch

    _, _, directory = checkpoint
    engine = engine_for(directory, caching=True)
    runner = engine.runner
    before = runner.kv_cache.clone()
    batch, _, _ = static_decode_batch(2, 8, runner.device, runner.num_groups)
    with torch.inference_mode():
        engine.model(batch, runner.kv_cache)
    torch.testing.assert_close(runner.kv_cache, before, rtol=0, atol=1e-5)  # the same K/V, up to rounding
    assert runner.kv_cache[..., : runner.num_groups, :1, :, :].abs().sum() > 0  # padding K/V are there to check


@pytest.mark.gpu
def test_gpu_engine_with_graphs_and_triton_kernels_matches_generate(checkpoint):
    """On the GPU in float32: CUDA-graph decode (each group's tables as graph inputs), the Triton decode and prefill
    kernels reading tables whose released entries point at padding blocks, prefix caching on (run twice) and
    off. Greedy tokens equal HF transformers' `generate` (CPU, float32)."""
    import torch

    _, hf, directory = checkpoint
    requests = requests_for(5)
    expected = {rid: hf_greedy(hf, prompt, NEW_TOKENS) for rid, (prompt, _) in requests.items()}
    for caching in (False, True):
        engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", device="cuda", block_size=BS,
                                        num_kv_blocks=200, max_num_batched_tokens=10, max_num_seqs=4,
                                        enable_prefix_caching=caching))
        assert engine.runner.num_graphs > 0 and engine.runner.kv_cache.is_cuda
        for attempt in range(2 if caching else 1):
            seen = []
            outputs = run(engine, {f"{rid}-{attempt}": r for rid, r in requests.items()},
                          on_step=lambda _, e: check_held_blocks(e, seen))
            got = {rid.rsplit("-", 1)[0]: tokens_of(outs) for rid, outs in outputs.items()}
            assert got == expected, (caching, attempt)
        if caching:
            assert engine.stats().prefix_cache_hits_total > 0
        torch.cuda.synchronize()


def test_the_mask_only_escape_hatch_keeps_every_block_and_the_same_tokens(checkpoint, monkeypatch):
    """STATICMOE_SLIDING_KV=mask: one full group (nothing released), windows applied by the masks alone; greedy
    output still generate's. An unknown mode is refused by name."""
    _, hf, directory = checkpoint
    requests = dict(list(requests_for(7).items())[:2])
    expected = {rid: hf_greedy(hf, prompt, NEW_TOKENS) for rid, (prompt, _) in requests.items()}
    monkeypatch.setenv("STATICMOE_SLIDING_KV", "mask")
    engine = engine_for(directory, caching=True)
    assert engine.block_manager.windows == (None,)
    outputs = run(engine, requests)
    assert {rid: tokens_of(outs) for rid, outs in outputs.items()} == expected
    monkeypatch.setenv("STATICMOE_SLIDING_KV", "drop")
    with pytest.raises(ValueError, match="STATICMOE_SLIDING_KV='drop': want one of free, mask"):
        engine_for(directory, caching=True)
