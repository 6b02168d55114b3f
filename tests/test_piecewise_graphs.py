"""Piecewise graphs of steps that prefill (model/engine/piecewise_graphs.py, step_pieces.py). On the CPU the pieces
are recorded as plain calls on the static buffers (what a replayed graph does), so the cut of the model, the bucket
padding and the buffers' reuse are tested anywhere: greedy output equals each request run alone, and with HF
transformers' generate for a sliding-window model with sinks; padding rows never reach the expert counts. On the GPU
(marked gpu) real graphs against the eager forward of the same steps."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.piecewise_graphs import bucket_sizes
from model.layers import fusion
from tests.engine_fixtures import GREEDY, one_cpu_thread, random_prompts, run, solo, tiny, tokens_of  # noqa: F401
from tests.deepseek_fixtures import make_deepseek_model
from tests.model_fixtures import hf_greedy, make_hf_model, save_checkpoint


def test_buckets_step_by_16_rows_then_256_and_end_at_the_largest_step():
    assert bucket_sizes(64) == [16, 32, 64]
    assert bucket_sizes(10) == [10]
    assert bucket_sizes(300) == [16, 32, 64, 128, 256, 300]
    sizes = bucket_sizes(4096)
    assert sizes[:6] == [16, 32, 64, 128, 256, 512] and sizes[-1] == 4096 and len(sizes) == 20
    assert all(b - a == 256 for a, b in zip(sizes[4:], sizes[5:]))


def spy_on_pieces(engine) -> list:
    """Record (bucket rows, real rows) of every piecewise step."""
    ran, pieces = [], engine.runner.pieces
    original = pieces.run

    def run_and_note(batch, kv_cache):
        ran.append((pieces.bucket(batch.num_tokens), batch.num_tokens))
        return original(batch, kv_cache)
    pieces.run = run_and_note
    return ran


def test_piecewise_steps_match_each_request_alone_and_padding_is_not_counted(solo):
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64))
    assert engine.runner.pieces is None  # the CPU captures none by itself
    engine.runner.capture_piecewise_graphs()
    assert engine.runner.pieces.sizes == [16, 32, 64]
    ran = spy_on_pieces(engine)
    prompts = random_prompts(9, seed=23, lengths=(3, 30, 150, 9, 64, 17, 1, 70, 5))
    requests = {f"p{i}": (p, SamplingParams(max_tokens=5 + 2 * i, **GREEDY)) for i, p in enumerate(prompts)}
    outputs = run(engine, requests, arrivals={0: ["p0", "p1", "p2"], 2: ["p3", "p4"], 5: ["p5", "p6", "p7", "p8"]})
    for rid, (prompt, params) in requests.items():
        assert tokens_of(outputs[rid]) == solo(prompt, params.max_tokens), rid
    assert len({bucket for bucket, _ in ran}) >= 2, ran
    assert any(bucket > real for bucket, real in ran) and any(real < 16 for _, real in ran), ran
    fed = sum(len(p) + params.max_tokens - 1 for p, params in requests.values())
    snap = engine.moe_stats()
    assert all(sum(layer) == fed * engine.model_config.top_k for layer in snap.expert_tokens_total)


def test_fp8_experts_through_pieces_give_the_eager_tokens():
    """Online FP8 experts (128x128 weight blocks, per-token activation groups: the op's reference numerics on the
    CPU; the tiny model's dense linears are too narrow to quantise and stay float32)."""
    config = dict(model="tiny", max_num_seqs=4, max_num_batched_tokens=64, quantization="fp8")
    prompts = random_prompts(4, seed=37, lengths=(50, 7, 90, 20))
    requests = {f"f{i}": (p, SamplingParams(max_tokens=8, **GREEDY)) for i, p in enumerate(prompts)}
    arrivals = {0: ["f0", "f1"], 3: ["f2", "f3"]}
    eager = LLMEngine(EngineConfig(**config))
    expected = {rid: tokens_of(outs) for rid, outs in run(eager, requests, arrivals).items()}
    engine = LLMEngine(EngineConfig(**config), model=eager.model, tokenizer=eager.tokenizer)
    engine.runner.capture_piecewise_graphs()
    ran = spy_on_pieces(engine)
    assert {rid: tokens_of(outs) for rid, outs in run(engine, requests, arrivals).items()} == expected
    assert any(real > 1 for _, real in ran)


def test_off_switch_and_an_eager_engine_keep_steps_eager():
    assert EngineConfig(model="tiny").piecewise_graphs is True  # on by default (captured on CUDA only)
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=64, piecewise_graphs=False))
    assert not engine.runner.wants_piecewise_graphs() and engine.runner.pieces is None
    with pytest.raises(ValueError, match="piecewise_graphs"):
        EngineConfig(model="tiny", piecewise_graphs="yes")


def test_a_failed_capture_leaves_steps_eager_and_the_engine_serving(monkeypatch, solo, caplog):
    from model.engine.piecewise_graphs import PiecewiseGraphs

    def fail(self):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(PiecewiseGraphs, "capture", fail)
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=64))
    engine.runner.capture_piecewise_graphs()
    assert engine.runner.pieces is None and "steps that prefill run eagerly" in caplog.text
    prompt = random_prompts(1, seed=3, lengths=(40,))[0]
    out = run(engine, {"r": (prompt, SamplingParams(max_tokens=6, **GREEDY))})
    assert tokens_of(out["r"]) == solo(prompt, 6)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek-v3-yarn", "qwen3_moe", "olmoe"])
def test_each_family_through_pieces_matches_generate(family, tmp_path):
    """gpt-oss: two KV-cache groups (sliding and full layers alternate), learned sinks, biases. DeepSeek-V3: MLA
    attention (its four projected inputs), a dense first layer, shared experts, grouped sigmoid routing. Qwen3:
    per-head q/k norms; OLMoE: norms over the whole projections. Chunked prefill of 10-token steps, so prompts span
    several piecewise steps beside decoding sequences."""
    if family.startswith("deepseek"):
        hf = make_deepseek_model(family.removeprefix("deepseek-"), seed=43)
    elif family == "gpt_oss":
        hf = make_hf_model(family, seed=43, sliding_window=8)
    else:
        hf = make_hf_model(family, seed=43)
    directory = save_checkpoint(hf, tmp_path / family)
    engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=200,
                                    max_num_batched_tokens=10, max_num_seqs=4))
    engine.runner.capture_piecewise_graphs()
    ran = spy_on_pieces(engine)
    prompts = random_prompts(4, seed=29, lengths=(23, 4, 37, 12))
    requests = {f"w{i}": (p, SamplingParams(max_tokens=20, **GREEDY)) for i, p in enumerate(prompts)}
    outputs = run(engine, requests, arrivals={0: ["w0", "w1"], 4: ["w2", "w3"]})
    assert {rid: tokens_of(outs) for rid, outs in outputs.items()} == \
        {rid: hf_greedy(hf, prompt, 20) for rid, (prompt, _) in requests.items()}
    assert any(real > 1 for _, real in ran) and any(bucket > real for bucket, real in ran), ran


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek-v3-yarn", "qwen3_moe"])
def test_start_up_mixed_padding_step_reads_and_writes_only_the_padding_blocks(family, tmp_path):
    """The start-up step that compiles the prefill and gathered-row decode attention on the GPU (a padding decode
    row and a 2-token padding prompt): through the pieces it gives the eager forward's logits, and it leaves every
    KV block but the groups' padding blocks as it found them (gpt-oss: two groups; DeepSeek-V3: MLA's cache)."""
    if family.startswith("deepseek"):
        hf = make_deepseek_model(family.removeprefix("deepseek-"), seed=5)
    else:
        hf = make_hf_model(family, seed=5, **({"sliding_window": 8} if family == "gpt_oss" else {}))
    directory = save_checkpoint(hf, tmp_path / family)
    engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=37,
                                    max_num_batched_tokens=16, max_num_seqs=4))
    engine.runner.capture_piecewise_graphs()
    runner = engine.runner
    cache = runner.kv_cache
    total_blocks = engine.block_manager.first_block + runner.num_usable_blocks
    assert list(cache.shape).count(total_blocks) == 1, cache.shape
    block_dim = list(cache.shape).index(total_blocks)
    torch.manual_seed(0)
    cache.copy_(torch.randn_like(cache))  # a cache full of other sequences' K/V, none of it zero
    before = cache.clone()
    batch = runner._pad_mixed_batch()
    assert batch.query_lens_host == [1, 2] and not batch.is_decode
    with torch.inference_mode():  # as the engine runs its steps
        pieces_logits = runner.pieces.run(batch, cache)
        eager_logits = runner.model(runner._pad_mixed_batch(), before.clone())
    assert pieces_logits.shape == (2, engine.model_config.vocab_size)
    torch.testing.assert_close(pieces_logits, eager_logits, rtol=1e-4, atol=1e-4)
    first = engine.block_manager.first_block  # below it: the groups' padding blocks
    assert torch.equal(cache.narrow(block_dim, first, total_blocks - first),
                       before.narrow(block_dim, first, total_blocks - first))


@pytest.mark.gpu
def test_piecewise_graphs_equal_the_eager_forward_of_the_same_steps():
    """Every piecewise step is recomputed eagerly with the graphs' kernels on the same batch: same logits (bf16
    noise), same greedy tokens where the margin is decisive; expert counts exclude the padding rows exactly."""
    engine = LLMEngine(EngineConfig(model="olmoe-1b-7b", random_weights=True, max_num_seqs=16,
                                    max_num_batched_tokens=768, max_model_len=512, num_kv_blocks=512,
                                    moe_timing_every=3))  # timed variants replay too
    pieces = engine.runner.pieces
    assert pieces is not None and pieces.sizes[-1] == 768
    checked, original = [], pieces.run

    loads = [block.experts.expert_load for block in engine.model.moe_blocks()]

    def run_and_compare(batch, kv_cache):
        logits = original(batch, kv_cache).clone()
        pad = pieces.bucket(batch.num_tokens) - batch.num_tokens
        counted = [load.clone() for load in loads]
        with fusion.for_graph_capture():  # the graphs' kernels, eagerly, on a copy of the cache (the pieces' K/V
            eager = engine.model(batch, kv_cache.clone())  # stay what later steps read)
        for load, before in zip(loads, counted):  # the recomputation's routing is not served tokens
            load.copy_(before)
        row_diff = (logits - eager).abs().max(dim=-1).values
        top2 = eager.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * row_diff
        checked.append((batch.num_tokens, pad, float(row_diff.max() / eager.abs().max()),
                        bool(torch.equal(logits.argmax(-1)[decisive], eager.argmax(-1)[decisive]))))
        return logits

    pieces.run = run_and_compare
    prompts = random_prompts(14, seed=31, lengths=(5, 40, 300, 17, 250, 90))
    requests = {f"g{i}": (p, SamplingParams(max_tokens=10 + i, **GREEDY)) for i, p in enumerate(prompts)}
    run(engine, requests, arrivals={0: list(requests)[:6], 4: list(requests)[6:10], 9: list(requests)[10:]})
    assert len(checked) >= 3 and any(pad > 0 for _, pad, _, _ in checked), checked
    assert all(err < 1e-2 and same for _, _, err, same in checked), checked
    torch.cuda.synchronize()
    fed = sum(len(p) + params.max_tokens - 1 for p, params in requests.values())
    snap = engine.moe_stats()  # its timed samples are those since the last snapshot: take one
    counts = torch.tensor(snap.expert_tokens_total)
    assert counts.sum(1).eq(fed * engine.model_config.top_k).all(), "padding rows were counted"
    timed = {key: pairs for key, pairs in engine.moe.timer.graph_pairs.items() if key[0] == "pieces"}
    assert len(timed) == len(pieces.sizes) and all(len(p) == len(engine.model.moe_blocks()) for p in timed.values())
    assert snap.timed, "no sampled step was read"
