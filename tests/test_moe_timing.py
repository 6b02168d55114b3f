"""fused_moe timing for the utilization metric (model/engine/moe_timer.py): sampled steps are timed as they run
(decode steps stay graph replays), samples carry the FLOPs of the rows fused_moe computed, events are read only
once complete. On the CPU the decode graphs are stand-ins that behave like captured graphs with event-record nodes
(each replay re-records the marks made at capture); on the GPU (marked gpu) real graphs and CUDA events."""

import statistics

import pytest
import torch

from benchmarks.moe_cases import moe_flops_per_token
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.moe_stats import MoeStatsCollector
from model.engine.moe_timer import MoeTimer, WallClockMark, marks_of, read_seconds, time_experts
from tests.engine_fixtures import GREEDY, engine_with_stand_in_graphs, one_cpu_thread, random_prompts, run  # noqa: F401


def routed_flops_per_token(config) -> int:
    """Routed-expert GEMM FLOPs of one token through every MoE layer, from the model config."""
    return config.num_layers * moe_flops_per_token(config)


class ReRecordingTimer:
    """What the event-record nodes of a captured graph do at each replay: re-record the capture's marks, in order."""

    def __init__(self, pairs):
        self.marks = [mark for pair in pairs for mark in pair]
        self.next = 0

    def start(self):
        self.marks[self.next].record()
        self.next += 1

    stop = start


class TimedStandInGraph:
    """Stands in for a captured CUDA graph on the CPU: capture() runs the model with the timer in capture mode (so
    the timer keeps this graph's marks); replay() recomputes the captured call on the static inputs and re-records
    those same marks around each fused_moe, as a real graph's event nodes do."""

    def __init__(self, engine, key, batch, logits):
        self.engine, self.key, self.batch, self.logits = engine, key, batch, logits

    def capture(self):
        timer = self.engine.moe.timer
        timer.begin_capture(self.key)
        self.logits.copy_(self.engine.runner.graph_forward(self.batch))
        timer.end_capture()

    def replay(self):
        pairs = self.engine.moe.timer.graph_pairs[self.key]
        replaying = ReRecordingTimer(pairs)
        recompute_with_timer(self, replaying)
        assert replaying.next == 2 * len(pairs)


def recompute_with_timer(graph: TimedStandInGraph, timer) -> None:
    """Recompute the stand-in's captured step with `timer` around the experts ops (None: no marks), then restore the
    engine's."""
    engine = graph.engine
    blocks = engine.model.moe_blocks()
    time_experts(blocks, timer)
    try:
        graph.logits.copy_(engine.runner.graph_forward(graph.batch))
    finally:
        engine.moe.timer.attach(blocks)


def engine_with_timed_graphs(**overrides):
    def make_graph(engine, key, batch, logits):
        graph = TimedStandInGraph(engine, key, batch, logits)
        graph.capture()
        return graph

    config = dict(model="tiny", max_num_seqs=4, max_num_batched_tokens=64, moe_timing_every=3)
    engine, _, _ = engine_with_stand_in_graphs(make_graph, **{**config, **overrides})
    engine.moe.reset_counts()  # as the engine does after its captures
    return engine


def test_sampled_decode_steps_stay_graph_replays_and_carry_the_flops_of_their_real_rows():
    engine = engine_with_timed_graphs()
    runner, every = engine.runner, engine.config.moe_timing_every
    steps = []  # per step: (graph key or None, real rows)
    execute, replay = runner.execute, runner._replay

    def logged_execute(out, *args, **kwargs):
        assert not args and not kwargs.get("force_eager"), "a step was switched to eager"
        steps.append([None, out.num_tokens, out.is_decode])
        return execute(out, *args, **kwargs)

    def logged_replay(g, out, *args):
        steps[-1][0] = g.graph.key
        return replay(g, out, *args)

    runner.execute, runner._replay = logged_execute, logged_replay
    engine.moe_stats()  # nothing before the traffic
    prompts = random_prompts(3, seed=5, lengths=(7, 20, 3))
    run(engine, {f"r{i}": (p, SamplingParams(max_tokens=9 + 2 * i, **GREEDY)) for i, p in enumerate(prompts)},
        arrivals={0: ["r0", "r1"], 2: ["r2"]})
    snap = engine.moe_stats()

    assert all(key is not None for key, _, is_decode in steps if is_decode), "a decode step ran eager"
    assert any(key is not None and key[0] > rows for key, rows, _ in steps), "no padded replay was sampled"
    per_token = routed_flops_per_token(engine.model_config)
    sampled = [steps[i] for i in range(every - 1, len(steps), every)]
    expected_flops = [rows * per_token for _, rows, _ in sampled]  # padding rows route nowhere: no expert FLOPs
    assert [f for _, f in snap.timed] == expected_flops
    assert any(key is not None for key, _, _ in sampled) and any(key is None for key, _, _ in sampled)
    assert all(seconds > 0 for seconds, _ in snap.timed)
    assert snap.timed_skipped_total == 0
    # the served-FLOPs counter counts real tokens only
    assert snap.flops_total == sum(rows for _, rows, _ in steps) * per_token


class PlainStandInGraph:
    """The variant of a decode step captured without timing events: recomputes the step, records no marks."""

    def __init__(self, timed: TimedStandInGraph, replays: list):
        self.timed, self.replays = timed, replays

    def replay(self):
        self.replays.append(self.timed.engine.moe.timer.sampling)
        recompute_with_timer(self.timed, None)


def test_only_sampled_decode_steps_replay_the_graph_variant_with_timing_events():
    """Event-record nodes slow every replay, so each decode step has a variant without them; a step sampled for
    timing must replay the timed variant (and still be read), every other step the plain one."""
    engine = engine_with_timed_graphs(moe_timing_every=3)
    plain, timed = [], []
    for g in engine.runner.graphs.values():
        g.timed, g.graph = g.graph, PlainStandInGraph(g.graph, plain)
        replay = g.timed.replay
        g.timed.replay = lambda replay=replay: timed.append(engine.moe.timer.sampling) or replay()
    prompts = random_prompts(3, seed=8, lengths=(5, 12, 2))
    run(engine, {f"p{i}": (p, SamplingParams(max_tokens=14, **GREEDY)) for i, p in enumerate(prompts)})
    snap = engine.moe_stats()
    assert timed and all(timed), "sampled steps must replay the timed variant, and only they"
    assert plain and not any(plain), "unsampled steps must replay the variant without events"
    graph_samples = [s for s in snap.timed if s[0] > 0]
    assert len(snap.timed) >= len(timed) and len(graph_samples) >= len(timed) and snap.timed_skipped_total == 0


def test_graph_sample_times_only_fused_moe_of_that_graph(tiny_blocks):
    """Capture marks around each block's fused_moe; a sampled replay of that graph reads exactly those pairs."""
    blocks, config = tiny_blocks
    collector = MoeStatsCollector(blocks, torch.device("cpu"), enabled=True, timing_every=2)
    timer = collector.timer
    x = torch.randn(4, config.hidden_size)  # [T, H]
    timer.begin_capture(("b4", "w8"))
    run_blocks(blocks, x)
    timer.end_capture()
    pairs = timer.graph_pairs[("b4", "w8")]
    assert len(pairs) == len(blocks) and all(isinstance(m, WallClockMark) for pair in pairs for m in pair)
    # eager, not sampled: the blocks record nothing
    collector.begin_step()
    run_blocks(blocks, x)
    collector.end_step(num_tokens=4)
    assert collector.snapshot().timed == []
    # sampled replay of the captured graph with 3 real rows and 1 padding row (routed nowhere: no expert FLOPs)
    collector.begin_step()
    timer.graph_replayed(("b4", "w8"))
    collector.end_step(num_tokens=3)
    snap = collector.snapshot()
    seconds = sum(end.t - start.t for start, end in pairs)
    assert snap.timed == [(pytest.approx(seconds), 3 * routed_flops_per_token(config))]
    assert snap.flops_total == 7 * routed_flops_per_token(config)


class InFlightEvent:
    """Stands in for a CUDA timing event of a graph replay still running on the device: query() is False and
    elapsed_time raises as torch's does ("Both events must be completed") until `done`."""

    def __init__(self, t_ms: float):
        self.t_ms, self.done = t_ms, False

    def record(self):
        pass

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end) -> float:
        if not (self.done and end.done):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return end.t_ms - self.t_ms


def graph_with_events(timer: MoeTimer, key, spans_ms):
    pairs = [(InFlightEvent(0.0), InFlightEvent(ms)) for ms in spans_ms]
    timer.graph_pairs[key] = pairs
    return pairs


def sampled_replay(timer: MoeTimer, key, flops: float):
    timer.begin_step(True)
    timer.graph_replayed(key)
    timer.end_step(flops)


def test_a_sample_whose_replay_still_runs_is_read_later_never_waited_for():
    timer = MoeTimer(torch.device("cpu"), enabled=True)
    pairs = graph_with_events(timer, "g", [1.0, 2.0])
    sampled_replay(timer, "g", 10.0)
    assert timer.poll() == []  # returns at once
    pairs[0][0].done = pairs[0][1].done = True  # first layer finished, second still running
    pairs[1][0].done = True
    assert timer.poll() == []
    pairs[1][1].done = True
    assert timer.poll() == [(pytest.approx(3e-3), 10.0)]
    assert timer.poll() == [] and timer.skipped == 0


def test_the_last_mark_complete_but_an_earlier_pair_overwritten_by_a_new_replay_is_not_read():
    timer = MoeTimer(torch.device("cpu"), enabled=True)
    pairs = graph_with_events(timer, "g", [1.0, 2.0])
    pairs[1][0].done = pairs[1][1].done = True  # elapsed_time of pair 0 raises: skipped, not a partial sum
    sampled_replay(timer, "g", 10.0)
    assert timer.poll() == []
    assert read_seconds(pairs) is None


def test_a_graph_sampled_again_before_its_read_replaces_the_pending_sample():
    timer = MoeTimer(torch.device("cpu"), enabled=True)
    pairs = graph_with_events(timer, "g", [4.0])
    other = graph_with_events(timer, "h", [1.0])
    sampled_replay(timer, "g", 10.0)
    sampled_replay(timer, "h", 5.0)
    sampled_replay(timer, "g", 10.0)  # same graph again: its events now belong to this replay
    assert timer.skipped == 1
    for start, end in pairs + other:
        start.done = end.done = True
    assert timer.poll() == [(pytest.approx(1e-3), 5.0), (pytest.approx(4e-3), 10.0)]


def test_pending_samples_are_bounded():
    from model.engine.moe_timer import MAX_PENDING

    timer = MoeTimer(torch.device("cpu"), enabled=True)
    for i in range(MAX_PENDING + 3):
        graph_with_events(timer, i, [1.0])
        sampled_replay(timer, i, 1.0)
    assert timer.skipped == 3 and timer.poll() == []


def test_cadence_every_nth_step_and_metrics_off_records_nothing(tiny_blocks):
    blocks, config = tiny_blocks
    collector = MoeStatsCollector(blocks, torch.device("cpu"), enabled=True, timing_every=4)
    x = torch.randn(2, config.hidden_size)
    for _ in range(12):
        collector.begin_step()
        run_blocks(blocks, x)
        collector.end_step(num_tokens=2)
    assert len(collector.snapshot().timed) == 3  # steps 4, 8, 12
    assert all(marks_of(block.experts) is collector.timer for block in blocks)
    off = MoeStatsCollector(blocks, torch.device("cpu"), enabled=False, timing_every=1)
    assert all(marks_of(block.experts) is None for block in blocks)
    off.begin_step()
    run_blocks(blocks, x)
    off.end_step(num_tokens=2)
    assert off.snapshot().timed == []


def test_utilization_truth_reads_graph_samples_and_its_rerun_leaves_the_counters_alone():
    """benchmarks/utilization_truth.py on stand-in graphs: its gauge side sees graph-replayed samples of exactly the
    decode batch, and re-running the sampled step to read the MoE inputs does not count any expert twice."""
    from benchmarks.utilization_truth import measure_utilization

    engine = engine_with_timed_graphs(moe_timing_every=2, max_num_seqs=3)
    prompts = random_prompts(3, seed=1, lengths=(20,))
    result = measure_utilization(engine, prompts, 12, budget_ms=1)
    assert "error" not in result, result["error"]
    assert result["graph_replayed"] and result["eager_decode_steps"] == 0 and result["decode_steps"] == 11
    assert result["graph_rows"] == 3 and result["engine_flops_match"]
    assert result["gauge_steps"] >= 5 and result["reference"] == "fused_moe_timer"  # no CUDA: the Timer
    fed = 3 * (20 + 12 - 1)
    k = engine.model_config.top_k
    assert engine.moe.read_counts_now().sum(dim=1).tolist() == [fed * k] * len(engine.model.moe_blocks())


@torch.no_grad()
def run_blocks(blocks, x):
    for block in blocks:
        block(x)


@pytest.fixture
def tiny_blocks():
    from model.loader import load_model

    model, _ = load_model("tiny", dtype=torch.float32, device="cpu")
    return model.moe_blocks(), model.config


# ---- GPU: real graphs, real events -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_events_in_a_captured_graph_time_fused_moe_like_a_direct_timing():
    """One MoE block (bf16, T = 64) captured in a CUDA graph with the timer's external events around fused_moe; the
    per-replay elapsed time must be positive and within 2x of fused_moe alone, captured in its own graph and timed
    by events around its replays."""
    from model.kernels import fused_moe, softmax_topk
    from model.layers.moe import SparseMoeBlock

    device = torch.device("cuda")
    torch.manual_seed(0)
    block = SparseMoeBlock(0, hidden_size=2048, num_experts=64, top_k=8, intermediate_size=1024,
                           renormalize=False).to(device, torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    timer = MoeTimer(device, enabled=True)
    timer.attach([block])
    x = torch.randn(64, 2048, device=device, dtype=torch.bfloat16)  # [T, H]
    with torch.inference_mode():
        block(x)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        timer.begin_capture("block")
        with torch.cuda.graph(graph):
            block(x)
        timer.end_capture()
        in_graph = []
        for _ in range(20):
            graph.replay()
            torch.cuda.synchronize()
            in_graph.append(read_seconds(timer.graph_pairs["block"]))

        weights, ids = softmax_topk(block.gate(x), 8, False)
        w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
        fused_moe(x, w13, w2, weights, ids)
        torch.cuda.synchronize()
        alone = torch.cuda.CUDAGraph()
        with torch.cuda.graph(alone):
            fused_moe(x, w13, w2, weights, ids)
        direct = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            alone.replay()
            end.record()
            end.synchronize()
            direct.append(start.elapsed_time(end) / 1e3)
    assert all(s is not None and s > 0 for s in in_graph), in_graph
    ratio = statistics.median(in_graph) / statistics.median(direct)
    assert 0.5 <= ratio <= 2.0, (statistics.median(in_graph), statistics.median(direct))


@pytest.mark.gpu
def test_gpu_engine_samples_graph_replays_without_eager_decode_steps():
    engine = LLMEngine(EngineConfig(model="tiny", device="cuda", max_num_seqs=8, max_num_batched_tokens=64,
                                    moe_timing_every=2))
    runner = engine.runner
    pairs = set(engine.moe.timer.graph_pairs)  # decode graphs by (batch, width); piecewise buckets ("pieces", rows)
    assert runner.num_graphs and {k for k in pairs if k[0] != "pieces"} == set(runner.graphs)
    assert {k[1] for k in pairs if k[0] == "pieces"} == (set(runner.pieces.timed) if runner.pieces else set())
    assert all(len(p) == len(engine.model.moe_blocks()) for p in engine.moe.timer.graph_pairs.values())
    steps, execute, replay = [], runner.execute, runner._replay

    def logged_execute(out, *args, **kwargs):
        steps.append([None, out.num_tokens, out.is_decode])
        return execute(out, *args, **kwargs)

    def logged_replay(g, out, *args):
        steps[-1][0] = g.batch.input_ids.shape[0]
        return replay(g, out, *args)

    runner.execute, runner._replay = logged_execute, logged_replay
    engine.moe_stats()
    prompts = random_prompts(6, seed=3)
    run(engine, {f"g{i}": (p, SamplingParams(max_tokens=12, **GREEDY)) for i, p in enumerate(prompts)})
    snap = engine.moe_stats()
    assert all(rows is not None for rows, _, is_decode in steps if is_decode), "a decode step ran eager"
    per_token = routed_flops_per_token(engine.model_config)
    sampled = [steps[i] for i in range(1, len(steps), 2)]
    assert any(g is not None and g > n for g, n, _ in sampled), "no padded replay was sampled"
    assert [f for _, f in snap.timed] == [n * per_token for _, n, _ in sampled]  # padding rows: no expert FLOPs
    assert all(seconds > 0 for seconds, _ in snap.timed)
    assert snap.timed_skipped_total == 0
