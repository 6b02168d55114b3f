"""Sampling hunt (session 27): the engine's per-sequence sampling state (penalty rows on the device, grammar
matchers, multi-token bad words, min_tokens, seeded draws, processed logprobs) must not depend on what a request is
batched with, on preemption by recompute, chunked prefill, prefix caching, aborts of its neighbours or
asynchronous scheduling. Reference: the same request run alone on a synchronous engine with room to spare."""

import random

import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.structured_output import compile_grammar
from tests.engine_fixtures import one_cpu_thread, tokens_of, text_of  # noqa: F401

MODE = "processed_logprobs"  # the logprobs of the distribution drawn from: penalties and masks included


def drive(engine, requests: dict, arrivals: dict, aborts: dict | None = None) -> dict:
    aborts, outs = aborts or {}, {}
    for step in range(3000):
        for rid in arrivals.get(step, []):
            engine.add_request(rid, *requests[rid])
        for rid in aborts.get(step, []):
            engine.abort_request(rid)
        if not engine.has_unfinished_requests() and step > max(arrivals):
            return outs
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def logprobs_of(outs) -> list:
    return [(lp.token_id, lp.logprob, lp.rank) for o in outs for lp in (o.logprobs or [])]


def same_logprobs(a: list, b: list) -> bool:
    """Batched and solo logits differ by float rounding (other matmul shapes): ids and ranks exact, values close."""
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) < 1e-3 for x, y in zip(a, b))


@pytest.fixture(scope="module")
def solo_engine():
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=512, async_scheduling=False,
                                  enable_prefix_caching=False, logprobs_mode=MODE))


def mixed_requests(engine, seed: int) -> dict:
    def grammar(kind, spec):
        return compile_grammar(kind, spec, engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)

    grammars = [grammar("regex", r"[a-f]{3,12}(x|yz)"), grammar("choice", ["alpha", "beta", "gamma delta"]),
                grammar("json_schema", {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
                                                                         "b": {"type": "integer"}},
                                        "required": ["a", "b"], "additionalProperties": False})]
    rng = random.Random(seed)
    shared = [rng.randrange(32, 127) for _ in range(16)]  # prefixes shared between prompts: prefix-cache hits
    requests = {}
    for i in range(12):
        prompt = shared[: rng.randrange(2, 16)] + [rng.randrange(32, 127) for _ in range(rng.randrange(1, 6))]
        kw = dict(max_tokens=rng.randrange(3, 18), temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(10**6),
                  logprobs=rng.choice([None, 0, 3]))
        if i % 2 == 0:
            kw.update(frequency_penalty=rng.uniform(-2, 2), presence_penalty=rng.uniform(-2, 2),
                      repetition_penalty=rng.uniform(0.5, 2))
        if i % 3 == 0:
            kw.update(grammar=grammars[i % len(grammars)], max_tokens=25)
        if i % 4 == 1:
            kw.update(bad_words_token_ids=[[rng.randrange(97, 103), rng.randrange(97, 103)], [rng.randrange(97, 103)]])
        if i % 5 == 2:
            kw.update(min_tokens=rng.randrange(0, kw["max_tokens"]), stop=["e"], logit_bias={256: 3.0})
        requests[f"r{i}"] = (prompt, SamplingParams(**kw))
    return requests


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_batched_preempted_and_aborted_runs_match_solo_runs(solo_engine, async_scheduling):
    requests = mixed_requests(solo_engine, seed=3)
    solo = {rid: drive(solo_engine, {rid: r}, {0: [rid]})[rid] for rid, r in requests.items()}
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=5, num_kv_blocks=14, block_size=4,
                                    max_num_batched_tokens=16, async_scheduling=async_scheduling,
                                    logprobs_mode=MODE))
    rng = random.Random(7)
    arrivals, aborts = {}, {}
    for rid in requests:
        arrivals.setdefault(rng.randrange(0, 10), []).append(rid)
    aborted = {"r1", "r4", "r9"}
    for rid in aborted:
        aborts.setdefault(rng.randrange(2, 20), []).append(rid)
    outs = drive(engine, requests, arrivals, aborts)
    assert engine.stats().num_preemptions_total > 0, "the KV cache was meant to force preemptions"
    for rid in requests:
        out, ref = outs[rid], solo[rid]
        if rid in aborted and out[-1].finish_reason == "abort":
            assert tokens_of(out) == tokens_of(ref)[: len(tokens_of(out))], rid
            continue
        assert tokens_of(out) == tokens_of(ref), rid
        assert (text_of(out), out[-1].finish_reason) == (text_of(ref), ref[-1].finish_reason), rid
        assert same_logprobs(logprobs_of(out), logprobs_of(ref)), (rid, logprobs_of(out), logprobs_of(ref))
    penalties = engine.sampling.penalties
    assert sorted(penalties.free) == list(range(penalties.capacity))  # every row handed back, none twice


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_penalty_row_freed_by_an_abort_starts_clean_for_its_next_owner(solo_engine, async_scheduling):
    """One slot: the aborted request's row (its counts of 12 output tokens, its prompt) is the next request's row."""
    first = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, frequency_penalty=2.0,
                           repetition_penalty=1.8)
    second = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=1.0,
                            presence_penalty=1.5, repetition_penalty=1.3)
    requests = {"a": (list(b"abcabcabc"), first), "b": (list(b"xyz"), second)}
    ref = drive(solo_engine, requests, {0: ["b"]})["b"]
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=1, async_scheduling=async_scheduling,
                                    logprobs_mode=MODE))
    rows = []
    engine_extras = engine.sampling.extras

    def spy(seqs):
        extras = engine_extras(seqs)
        rows.extend((s.request_id, s.penalty_row) for s in seqs if s.penalty_row >= 0)
        return extras

    engine.sampling.extras = spy
    outs = drive(engine, requests, {0: ["a"], 14: ["b"]}, {13: ["a"]})
    assert outs["a"][-1].finish_reason == "abort" and len(tokens_of(outs["a"])) >= 10
    assert {row for rid, row in rows if rid == "a"} == {row for rid, row in rows if rid == "b"}  # the same row
    assert tokens_of(outs["b"]) == tokens_of(ref)
