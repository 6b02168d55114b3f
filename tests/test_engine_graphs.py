"""Decode through static (CUDA-graph) batches: on the CPU with a stand-in graph that recomputes the captured call,
so the runner's padding and input buffers are tested anywhere; on the GPU (marked gpu) real graphs against eager
decode, and the expert counters against the routing recomputed from the MoE blocks' inputs."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.kernels import jit_monitor, softmax_topk
from model.layers import fusion
from tests.engine_fixtures import (GREEDY, EagerGraph, engine_with_stand_in_graphs, one_cpu_thread,  # noqa: F401
                                  random_prompts, run, solo, tiny, tokens_of)


def engine_with_eager_graphs(**overrides):
    """A tiny CPU engine whose decode steps replay EagerGraph stand-ins of every (batch, width) the GPU captures."""
    config = dict(model="tiny", max_num_seqs=8, max_num_batched_tokens=64, moe_timing_every=1000)
    return engine_with_stand_in_graphs(lambda engine, key, batch, logits: EagerGraph(engine.runner, batch, logits),
                                       **{**config, **overrides})


def test_padded_static_decode_batches_match_solo_and_padding_is_not_counted(solo):
    engine, sizes, widths = engine_with_eager_graphs()
    runner = engine.runner
    assert sizes == [1, 2, 4, 8] and widths[0] == 8 and widths[-1] == runner.max_blocks_per_seq
    replays, replay = [], runner._replay
    runner._replay = lambda g, out, *args: replays.append((g.batch.num_seqs, len(out.scheduled))) or replay(g, out, *args)
    prompts = random_prompts(7, seed=14, lengths=(3, 30, 150, 9, 64, 17, 1))
    requests = {f"q{i}": (p, SamplingParams(max_tokens=6 + 3 * i, **GREEDY)) for i, p in enumerate(prompts)}
    outputs = run(engine, requests, arrivals={0: ["q0", "q1", "q2"], 3: ["q3", "q4", "q5", "q6"]})
    assert any(padded > real for padded, real in replays) and len({r for _, r in replays}) > 2, replays
    for rid, (prompt, params) in requests.items():
        assert tokens_of(outputs[rid]) == solo(prompt, params.max_tokens), rid
    snap = engine.moe_stats()
    fed = sum(len(p) + params.max_tokens - 1 for p, params in requests.values())
    assert all(sum(layer) == fed * engine.model_config.top_k for layer in snap.expert_tokens_total)


def expected_static_inputs(out, b: int, w: int, block_size: int, sampled_before=None) -> tuple[list[int], list[int]]:
    """The two input buffers of a decode replay, built from the sequences' Python block tables (padding rows: token
    0 at position 0, slot -1, context 1, block table of pad block 0). A last token still in flight (asynchronous
    scheduling) is the previous step's sampled id."""
    ids, pos, slots, ctx, tables = [], [], [], [], []
    for s in out.scheduled:
        seq = s.seq
        p = seq.num_tokens - 1
        token = int(sampled_before[seq.pending_row]) if seq.num_pending else seq.token_ids[p]
        ids.append(token), pos.append(p), ctx.append(p + 1)
        slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        tables += seq.block_table + [0] * (w - len(seq.block_table))
    pad = b - len(ids)
    return ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad, ctx + [1] * pad + tables + [0] * (w * pad)


def test_replay_inputs_equal_those_built_from_block_tables():
    """The staging buffers are reused and the block tables come from the block manager's rows: every replay's
    device inputs must still equal what the sequences' own lists say, including rows that were real in a
    larger batch before and are padding now, and rows of finished sequences reused by new ones."""
    engine, _, _ = engine_with_eager_graphs(max_num_seqs=4, block_size=4)
    runner, checked, fed = engine.runner, [], []
    replay = runner._replay

    def replay_and_check(g, out, sampled_before=None):
        logits = replay(g, out, sampled_before)
        b, w = g.batch.block_tables.shape
        int64_expected, int32_expected = expected_static_inputs(out, b, w, runner.block_size, sampled_before)
        fed.append(sum(s.seq.num_pending for s in out.scheduled))
        assert g.int64_inputs.tolist() == int64_expected
        assert g.int32_inputs.tolist() == int32_expected
        checked.append((b, len(out.scheduled)))
        return logits

    runner._replay = replay_and_check
    prompts = random_prompts(9, seed=3, lengths=(3, 13, 6, 1, 22, 9))
    requests = {f"q{i}": (p, SamplingParams(max_tokens=3 + 5 * (i % 4), **GREEDY)) for i, p in enumerate(prompts)}
    run(engine, requests, arrivals={0: ["q0", "q1", "q2", "q3"], 4: ["q4", "q5"], 9: ["q6", "q7", "q8"]})
    assert any(real < b for b, real in checked) and len({real for _, real in checked}) >= 3, checked
    assert any(fed), "no replay fed a token still on the device (asynchronous scheduling)"


# ---- GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_decode():
    """Every replayed decode step is recomputed eagerly on the same (padded) inputs: same logits, same tokens."""
    engine = LLMEngine(EngineConfig(model="olmoe-1b-7b", random_weights=True, max_num_seqs=32,
                                    max_num_batched_tokens=1024, max_model_len=512, num_kv_blocks=256))
    assert engine.runner.num_graphs > 0
    runner, checked = engine.runner, []
    replay = runner._replay

    def replay_and_compare(graph, out, *args):
        logits = replay(graph, out, *args).clone()  # [n, V]
        with fusion.for_graph_capture():  # the graph's kernels, eagerly (small eager steps skip the fused ones)
            eager = engine.model(graph.batch, runner.kv_cache)[: logits.shape[0]]  # rewrites the same K/V
        row_diff = (logits - eager).abs().max(dim=-1).values  # [n]
        top2 = eager.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * row_diff  # rows whose greedy token the difference cannot flip
        checked.append((graph.batch.num_seqs, len(out.scheduled), float(row_diff.max() / eager.abs().max()),
                        bool(torch.equal(logits.argmax(-1)[decisive], eager.argmax(-1)[decisive]))))
        return logits

    runner._replay = replay_and_compare
    prompts = random_prompts(19, seed=10, lengths=(5, 40, 100, 17, 250))
    requests = {f"g{i}": (p, SamplingParams(max_tokens=12 + i, **GREEDY)) for i, p in enumerate(prompts)}
    run(engine, requests, arrivals={0: list(requests)[:10], 6: list(requests)[10:]})
    assert len({real for _, real, _, _ in checked}) > 3, "decode batches of several sizes should replay graphs"
    assert any(padded > real for padded, real, _, _ in checked), "no padded replay"
    assert all(err < 1e-3 and same for _, _, err, same in checked), checked


@pytest.mark.gpu
def test_no_triton_kernel_compiles_after_start_up():
    """Start-up compiles every Triton kernel a step runs (decode graphs, the piecewise pieces and the eager attention
    between them), so no user's first prefill or decode step waits for a compile (model/kernels/jit_monitor.py)."""
    engine = LLMEngine(EngineConfig(model="olmoe-1b-7b", random_weights=True, max_num_seqs=8,
                                    max_num_batched_tokens=1024, max_model_len=512, num_kv_blocks=256))
    assert engine.runner.pieces is not None, "steps that prefill should run in piecewise graphs"
    prompts = random_prompts(4, seed=3, lengths=(5, 40, 100, 17))
    run(engine, {f"p{i}": (p, SamplingParams(max_tokens=6, **GREEDY)) for i, p in enumerate(prompts)})
    assert jit_monitor.specializations_after_start() == 0, "\n".join(jit_monitor.kernels_specialized_after_start())


@pytest.mark.gpu
def test_moe_stats_expert_counts_equal_recomputed_routing():
    """Eager: the harvested counts equal a bincount of the routing recomputed (by a forward pre-hook) from the very
    inputs of each SparseMoeBlock. With CUDA graphs: padding rows route nowhere, so each layer still counts
    exactly tokens × top_k, and per-expert counts stay within 3% of the eager run: the graphs' fused kernels (decode
    graphs, and the piecewise graphs of the prefill steps) round differently from the eager ops, so near-tied
    experts of a random-weight model flip (H100: 8–30 of 1424 slot choices per layer differed, 2026-12-07)."""
    cfg = dict(model="olmoe-1b-7b", random_weights=True, max_num_seqs=8, max_model_len=256, num_kv_blocks=256,
               moe_timing_every=1000)
    prompts = random_prompts(5, seed=11, lengths=(7, 30, 64, 3, 19))  # 5 sequences decode in graphs of 8
    requests = {f"c{i}": (p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts)}
    fed = sum(len(p) + 12 - 1 for p, _ in requests.values())

    eager = LLMEngine(EngineConfig(**cfg, enforce_eager=True))
    blocks = eager.model.moe_blocks()
    expected = torch.zeros(len(blocks), blocks[0].num_experts, dtype=torch.int64, device=eager.device)

    def recount(i):
        def hook(block, args):
            _, ids = softmax_topk(block.gate(args[0]), block.top_k, block.renormalize)
            expected[i] += torch.bincount(ids.reshape(-1).long(), minlength=block.num_experts)
        return hook

    hooks = [b.register_forward_pre_hook(recount(i)) for i, b in enumerate(blocks)]
    try:
        run(eager, requests)
    finally:
        for h in hooks:
            h.remove()
    torch.cuda.synchronize()  # the last counter copy was issued without waiting; let it land before reading
    eager_counts = torch.tensor(eager.moe_stats().expert_tokens_total)
    assert torch.equal(eager_counts, expected.cpu())
    assert eager_counts.sum(1).eq(fed * blocks[0].top_k).all()

    graphed = LLMEngine(EngineConfig(**cfg), model=eager.model, tokenizer=eager.tokenizer)
    assert graphed.runner.num_graphs > 0
    run(graphed, requests)
    torch.cuda.synchronize()
    counts = torch.tensor(graphed.moe_stats().expert_tokens_total)
    assert counts.sum(1).eq(fed * blocks[0].top_k).all(), "padding rows were counted"
    assert (counts - eager_counts).abs().sum(1).le(0.03 * fed * blocks[0].top_k).all()


def sampling_steps(engine) -> dict:
    """Record, per request id, each step that sampled one of its tokens as (decode graph batch size, or ("eager",
    rows); sequences in the step; the request's row). Returns the dict the engine's steps fill."""
    steps, runner, shape = {}, engine.runner, []
    execute, replay = runner.execute, runner._replay

    def logged_execute(out, *args, **kwargs):
        shape[:] = [("eager", out.num_tokens)]
        logits = execute(out, *args, **kwargs)
        ids = [s.seq.request_id for s in out.scheduled]
        for s in out.scheduled:
            if s.samples:
                steps.setdefault(s.seq.request_id, []).append((shape[0], len(ids), ids.index(s.seq.request_id)))
        return logits

    def logged_replay(g, out, *args):
        shape[0] = g.batch.num_seqs
        return replay(g, out, *args)

    runner.execute, runner._replay = logged_execute, logged_replay
    return steps


def compare_async_with_sync(make_engine, requests, arrivals) -> None:
    """Run `requests` synchronously, then asynchronously (make_engine(async_scheduling)): the same steps (each
    token of each request sampled in a step of the same shape, batch and row), and the same tokens."""
    sync = make_engine(False)
    sync_steps = sampling_steps(sync)
    expected = {rid: tokens_of(outs) for rid, outs in run(sync, requests, arrivals).items()}
    engine = make_engine(True)
    steps, ran_ahead = sampling_steps(engine), []
    got = run(engine, requests, arrivals, on_step=lambda step, e: ran_ahead.append(e._in_flight is not None))
    assert sum(ran_ahead) > len(ran_ahead) // 2, "most steps should run ahead"
    assert steps == sync_steps, "the schedule differs: the comparison below would not be of the same computation"
    assert any(isinstance(graph, int) and graph > rows
               for per_request in steps.values() for graph, rows, _ in per_request), "no padded graph replay"
    assert {rid: tokens_of(outs) for rid, outs in got.items()} == expected


# 11 requests, all admitted at once (max_num_seqs 16): no request waits, so both modes run the same steps
ASYNC_PROMPTS = random_prompts(11, seed=17, lengths=(7, 30, 64, 3, 19))
ASYNC_REQUESTS = {f"a{i}": (p, SamplingParams(max_tokens=6 + 3 * i, **GREEDY)) for i, p in enumerate(ASYNC_PROMPTS)}
ASYNC_ARRIVALS = {0: list(ASYNC_REQUESTS)[:4], 3: list(ASYNC_REQUESTS)[4:8], 9: list(ASYNC_REQUESTS)[8:]}
ASYNC_ENGINE = dict(max_num_seqs=16, max_model_len=256, num_kv_blocks=256, moe_timing_every=5)


def test_asynchronous_scheduling_on_stand_in_graphs_gives_the_tokens_of_synchronous_steps():
    """The CPU twin of the GPU test below: stand-in graphs, so the device feeding of sampled ids and the padded
    static batches are checked against synchronous steps anywhere."""
    def make(async_scheduling):
        engine, _, _ = engine_with_stand_in_graphs(
            lambda e, key, batch, logits: EagerGraph(e.runner, batch, logits), model="tiny",
            async_scheduling=async_scheduling, **ASYNC_ENGINE)
        return engine
    compare_async_with_sync(make, ASYNC_REQUESTS, ASYNC_ARRIVALS)


@pytest.mark.gpu
def test_asynchronous_scheduling_on_cuda_graphs_gives_the_tokens_of_synchronous_steps(monkeypatch):
    """On the GPU each decode step's graph inputs take the previous step's sampled ids from the device (a slice
    copy, or an index_copy when the batch changed) and the ids reach the host by a pinned non-blocking copy. With
    every request admitted at once, both modes run the same steps (checked); with the compiled small ops in every
    step, a row's result does not depend on the other rows of a step of the same shape (padding rows included, which
    route to no expert), so every token must be the same. (Small eager steps use the unfused ops by default, whose
    reductions depend on the row count.) Before 2026-12-07 this ran 11 requests through 8 slots: a waiting prompt
    then started a step later asynchronously (a finishing sequence holds its slot one step longer), the last
    request decoded in graphs of other batch sizes in the two modes (8 vs 4, 4 vs 2: other attention splits and
    GEMM shapes), and on the H100 one of its greedy tokens flipped."""
    monkeypatch.setattr(fusion, "EAGER_MIN_ROWS", 0)
    cfg = dict(model="olmoe-1b-7b", random_weights=True, **ASYNC_ENGINE)  # moe_timing_every: timed graphs replay too
    first = LLMEngine(EngineConfig(**cfg, async_scheduling=False))

    def make(async_scheduling):
        if not async_scheduling:
            return first
        return LLMEngine(EngineConfig(**cfg), model=first.model, tokenizer=first.tokenizer)
    compare_async_with_sync(make, ASYNC_REQUESTS, ASYNC_ARRIVALS)
