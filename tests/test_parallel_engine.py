"""The engine on a parallel model (this process is rank 0; workers are spawned gloo ranks): greedy generation equals
one rank's, with chunked prefill, several sequences and preemption-free continuous batching; expert-load metrics
still count every expert; a worker that dies makes the engine raise at once instead of hanging."""

import dataclasses
import os
import signal
import time

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.parallel import ParallelConfig
from model.parallel.launcher import ParallelWorkerError, parallel_engine
from tests.engine_fixtures import GREEDY, one_cpu_thread, run, tokens_of  # noqa: F401
from tests.model_fixtures import make_hf_model, save_checkpoint

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [100, 101], [33] * 40, [7]]
MAX_TOKENS = 12


def engine_config(model: str) -> EngineConfig:
    # small step budget: the 40-token prompt is prefilled in chunks while other sequences decode
    return EngineConfig(model=model, max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=96, block_size=4)


def requests() -> dict:
    return {f"r{i}": (prompt, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY)) for i, prompt in enumerate(PROMPTS)}


def generate(engine) -> dict[str, list[int]]:
    arrivals = {0: ["r0", "r1"], 3: ["r2"], 5: ["r3"]}  # later arrivals join running batches
    return {rid: tokens_of(outs) for rid, outs in run(engine, requests(), arrivals).items()}


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory) -> str:
    return str(save_checkpoint(make_hf_model("qwen2_moe"), tmp_path_factory.mktemp("qwen2_moe")))


def test_greedy_generation_of_two_ranks_equals_one_and_a_dead_rank_fails_the_engine(qwen2_checkpoint):
    single = LLMEngine(engine_config(qwen2_checkpoint))
    expected = generate(single)
    engine = parallel_engine(engine_config(qwen2_checkpoint), ParallelConfig(2, 2, collective_timeout_s=30))
    try:
        assert generate(engine) == expected
        assert all(len(tokens) == MAX_TOKENS for tokens in expected.values())
        # rank 0 holds experts 0-2 only, yet counts all 6 (the routing is replicated), as one rank does
        counts = engine.moe_stats().expert_tokens_total
        assert len(counts[0]) == 6 and sum(counts[0][3:]) > 0
        assert counts == single.moe_stats().expert_tokens_total

        # a worker killed mid-generation: the next step raises (no hang), and so does every later check
        engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=50, **GREEDY))
        engine.step()
        os.kill(engine.workers.pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises((RuntimeError, ParallelWorkerError)):
            for _ in range(50):
                engine.step()
        assert time.monotonic() - started < 10
        deadline = time.monotonic() + 10
        while engine.workers.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(ParallelWorkerError, match="rank 1"):
            engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_tiny_preset_on_four_ranks_generates_as_one():
    expected = generate(LLMEngine(engine_config("tiny")))
    engine = parallel_engine(engine_config("tiny"), ParallelConfig(4, 2, collective_timeout_s=30))
    try:
        assert generate(engine) == expected
        assert engine.model.layout.experts == (0, 4) and engine.model.kv_cache_shape(1, 4)[4] == 1
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.workers.processes.values()), "shutdown stops the workers"
    assert not torch.distributed.is_initialized()


class _RecordReplay:
    """Stands in for the CUDA graph on the CPU: the test compares the inputs written before a replay."""

    replays = 0

    def replay(self):
        self.replays += 1


def test_worker_fills_decode_graph_inputs_as_rank_0_does():
    from model.engine.decode_inputs import static_decode_batch
    from model.engine.model_runner import _Graph

    engine = LLMEngine(dataclasses.replace(engine_config("tiny"), async_scheduling=False))  # as with workers
    for i, n in enumerate((3, 21, 38)):
        engine.add_request(f"s{i}", list(range(1, n + 1)), SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(8):  # prefill chunks, then decode steps
        engine.step()
    out = engine.scheduler.schedule()
    assert out.is_decode and len(out.scheduled) == 3
    runner, key = engine.runner, (4, 16)

    def graph() -> _Graph:
        batch, int64_inputs, int32_inputs = static_decode_batch(*key, runner.device, runner.num_groups)
        return _Graph(_RecordReplay(), batch, torch.zeros(key[0], 1), int64_inputs, int32_inputs)

    sent = []
    rank0 = runner.graphs[key] = graph()
    runner.step_listener = lambda graph_key, inputs: sent.append((graph_key, inputs.encode()))
    runner._replay(rank0, out)  # what rank 0 writes into its graph, and sends
    runner.step_listener = None
    assert [k for k, _ in sent] == [key] and rank0.graph.replays == 1
    worker = runner.graphs[key] = graph()
    runner.replay_encoded(key, sent[0][1])
    assert worker.graph.replays == 1
    assert torch.equal(worker.int64_inputs, rank0.int64_inputs)
    assert torch.equal(worker.int32_inputs, rank0.int32_inputs)
    ids, positions, slots = rank0.int64_inputs.view(3, 4).tolist()
    assert positions[2] >= 38 and slots[2] >= 0 and slots[3] == -1  # 3 real rows, then a padding row
