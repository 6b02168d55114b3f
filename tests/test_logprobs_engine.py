"""Logprobs and prompt logprobs from the engine equal a full-vocabulary log_softmax of the model's logits recomputed
here by one plain prefill of prompt + output (tests/reference_model.py): across chunked prefill, batching,
asynchronous scheduling and preemption by recompute."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_fixtures import one_cpu_thread, random_prompts, run, tokens_of  # noqa: F401
from tests.reference_model import full_forward, tiny_reference_model

TOL = 2e-4  # float32 engine vs float32 reference, different kernels and chunking


@pytest.fixture(scope="module")
def reference():
    return tiny_reference_model()


def check(reference, prompt: list[int], outs: list, k: int, prompt_k: int | None) -> None:
    tokens = tokens_of(outs)
    logprobs = torch.log_softmax(full_forward(reference, prompt + tokens).double(), dim=-1)  # [L, V]
    got = [lp for o in outs for lp in o.logprobs]
    assert len(got) == len(tokens)
    for i, (token, lp) in enumerate(zip(tokens, got)):
        row = logprobs[len(prompt) - 1 + i]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token].item(), abs=TOL)
        assert lp.rank == int((row > row[token] + TOL).sum()) + 1 or lp.rank == int((row > row[token]).sum()) + 1
        assert len(lp.top) == k
        best = row.topk(k).values.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best, abs=TOL)
        for t, v in lp.top:
            assert row[t].item() == pytest.approx(v, abs=TOL)
    if prompt_k is None:
        assert outs[0].prompt_logprobs is None
        return
    first = outs[0].prompt_logprobs
    assert len(first) == len(prompt) and first[0] is None
    assert all(o.prompt_logprobs is None for o in outs[1:])
    for position, lp in enumerate(first[1:], start=1):
        row = logprobs[position - 1]
        assert lp.token_id == prompt[position]
        assert lp.logprob == pytest.approx(row[prompt[position]].item(), abs=TOL)
        assert [v for _, v in lp.top] == pytest.approx(row.topk(prompt_k).values.tolist(), abs=TOL)


@pytest.mark.parametrize("async_scheduling, pieces", [(True, False), (False, False), (True, True)])
def test_logprobs_match_a_full_vocabulary_log_softmax(reference, async_scheduling, pieces):
    """`pieces`: steps that prefill run through the piecewise graphs' pieces (plain calls on the CPU), whose logit
    rows (prompt logprobs: several per chunk) come from padded static buffers."""
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64,
                                    async_scheduling=async_scheduling))
    if pieces:
        engine.runner.capture_piecewise_graphs()
    prompts = random_prompts(5, seed=3, lengths=(150, 3, 40, 1, 65))  # 150 and 65: several prefill chunks
    cases = [(5, 3), (0, None), (20, 20), (1, 0), (3, 2)]
    requests = {f"r{i}": (p, SamplingParams(max_tokens=7, temperature=0.8 if i % 2 else 0.0, seed=i,
                                            ignore_eos=True, logprobs=k, prompt_logprobs=pk))
                for i, (p, (k, pk)) in enumerate(zip(prompts, cases))}
    requests["none"] = (prompts[2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    outs = run(engine, requests)
    for rid, (prompt, params) in requests.items():
        if rid == "none":
            assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs[rid])
            continue
        check(reference, prompt, outs[rid], params.logprobs, params.prompt_logprobs)


@pytest.mark.parametrize("pieces", [False, True])
def test_logprobs_survive_preemption(reference, pieces):
    """A KV cache too small for all sequences: some are preempted and recomputed, their prompt logprobs are not
    reported twice and every logprob still matches (with `pieces`, through the piecewise graphs' pieces)."""
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=6, max_num_batched_tokens=32, num_kv_blocks=14,
                                    block_size=4))
    if pieces:
        engine.runner.capture_piecewise_graphs()
    prompts = random_prompts(6, seed=4, lengths=(9, 12, 7, 10, 11, 8))
    requests = {f"p{i}": (p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2,
                                            prompt_logprobs=1)) for i, p in enumerate(prompts)}
    outs = run(engine, requests)
    assert engine.scheduler.num_preemptions_total > 0, "the cache was meant to force preemptions"
    for rid, (prompt, _) in requests.items():
        check(reference, prompt, outs[rid], 2, 1)


def test_prompt_logprobs_and_cache_salt_with_prefix_caching(reference):
    """A prompt already in the prefix cache still gets every prompt logprob (it takes no cached blocks); a
    different cache_salt never shares blocks, the same salt does."""
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=64,
                                    enable_prefix_caching=True))
    prompt = random_prompts(1, seed=9, lengths=(70,))[0]
    greedy = dict(max_tokens=3, temperature=0.0, ignore_eos=True)
    run(engine, {"warm": (prompt, SamplingParams(**greedy))})
    hits = engine.scheduler.prefix_cache_hits_total
    outs = run(engine, {"scored": (prompt, SamplingParams(logprobs=1, prompt_logprobs=2, **greedy))})
    assert engine.scheduler.prefix_cache_hits_total == hits
    check(reference, prompt, outs["scored"], 1, 2)
    run(engine, {"salted": (prompt, SamplingParams(cache_salt="tenant-a", **greedy))})
    assert engine.scheduler.prefix_cache_hits_total == hits, "another salt must not share the unsalted blocks"
    run(engine, {"salted-again": (prompt, SamplingParams(cache_salt="tenant-a", **greedy))})
    assert engine.scheduler.prefix_cache_hits_total > hits, "the same salt shares"
