"""Helpers shared by the engine tests: a driver loop, output accessors, prompts, the tiny engine and its cached
solo (greedy, alone) outputs."""

import random

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core runner two threads wait on
    each other for milliseconds per op (measured: 42 ms vs 2 ms per step)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(engine, requests: dict, arrivals: dict | None = None, on_step=None, max_steps=5000) -> dict:
    """requests: id -> (prompt ids, SamplingParams); arrivals: step -> ids added at that step (default all at 0).
    Returns id -> list of RequestOutput."""
    arrivals = arrivals or {0: list(requests)}
    outputs: dict[str, list] = {}
    for step in range(max_steps):
        for rid in arrivals.get(step, []):
            engine.add_request(rid, *requests[rid])
        if not engine.has_unfinished_requests() and step > max(arrivals):
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if on_step:
            on_step(step, engine)
    raise AssertionError("engine did not finish")


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text_of(outs) -> str:
    return "".join(o.new_text for o in outs)


def random_prompts(n: int, seed: int, lengths=(1, 3, 17, 40, 90, 130, 5, 64, 65, 200, 2, 33)) -> list[list[int]]:
    """ASCII bytes, so that a prompt never ends inside a multi-byte character that its first output bytes complete."""
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def solo(tiny):
    """Greedy output of a request run alone on the tiny engine (cached)."""
    cache: dict = {}

    def get(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            outs = run(tiny, {"solo": (prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))})["solo"]
            cache[key] = tokens_of(outs)
        return cache[key]
    return get




class EagerGraph:
    """Stands in for a captured decode CUDA graph on the CPU: replay() recomputes the captured call (the runner's
    graph_forward) on the static input buffers, so the runner's padding and buffer filling are tested without a
    GPU."""

    def __init__(self, runner, batch, logits):
        self.runner, self.batch, self.logits = runner, batch, logits

    def replay(self):
        self.logits.copy_(self.runner.graph_forward(self.batch))


def engine_with_stand_in_graphs(make_graph, **config):
    """A tiny CPU engine whose decode steps replay stand-ins for every (batch, width) graph the GPU would capture.
    make_graph(engine, key, batch, logits) returns the stand-in (an object with replay()). Returns
    (engine, batch sizes, widths)."""
    from model.engine.decode_inputs import static_decode_batch
    from model.engine.model_runner import _Graph, graph_batch_sizes, graph_widths

    engine = LLMEngine(EngineConfig(**config))
    runner = engine.runner
    sizes, widths = graph_batch_sizes(engine.config.max_num_seqs), graph_widths(runner.max_blocks_per_seq)
    for b in sizes:
        for w in widths:
            batch, int64_inputs, int32_inputs = static_decode_batch(b, w, runner.device, runner.num_groups)
            logits = torch.empty(b, engine.model_config.vocab_size)
            graph = make_graph(engine, (b, w), batch, logits)
            runner.graphs[(b, w)] = _Graph(graph, batch, logits, int64_inputs, int32_inputs)
    runner.graph_batch_sizes, runner.graph_widths = sizes, widths
    return engine, sizes, widths
