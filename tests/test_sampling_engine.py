"""Every sampling parameter of issue 20 on the real engine (tiny model, CPU), checked against an independent
reference: the logits the model handed the sampler are recorded, the parameter's definition is re-applied to them
here in plain Python, and the token the engine chose must be the reference's choice at every step."""

import collections
import math

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.logprobs import LogprobsMode
from model.engine.sampler import Sampler, SamplingExtras
from model.engine.penalties import PenaltyState
from tests.engine_fixtures import one_cpu_thread, run, tokens_of, text_of  # noqa: F401

NEG_INF = -math.inf


def reference_logits(raw: list[float], p: SamplingParams, prompt: list[int], outputs: list[int],
                     eos: list[int]) -> list[float]:
    """The definitions, one token at a time: allowed ids, min_tokens and bad-word bans, logit_bias, then the
    repetition (prompt + output), frequency and presence (output) penalties."""
    x = [float(v) for v in raw]
    V = len(x)
    if p.allowed_token_ids is not None:
        x = [v if t in p.allowed_token_ids else NEG_INF for t, v in enumerate(x)]
    if len(outputs) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else eos):
            x[t] = NEG_INF
    for word in p.bad_words_token_ids:
        if len(word) == 1 or (len(outputs) >= len(word) - 1 and outputs[len(outputs) - len(word) + 1:] == word[:-1]):
            x[word[-1]] = NEG_INF
    for t, b in p.logit_bias.items():
        x[t] += b
    counts = collections.Counter(outputs)
    for t in range(V):
        if t in prompt or counts[t]:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    return x


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64))


def record_sampler_inputs(engine):
    """Wrap the sampler: every call's (logits, params) is recorded. Returns the list and an undo function."""
    calls, original = [], engine.sampler.sample

    def recording(logits, params, generators, extras=None):
        calls.append((logits.detach().clone(), list(params)))
        return original(logits, params, generators, extras)

    engine.sampler.sample = recording
    return calls, lambda: setattr(engine.sampler, "sample", original)


def logits_per_request(calls, params_by_id: dict) -> dict:
    """request id -> the logits rows its sampled tokens were drawn from, in order."""
    ident = {id(p): rid for rid, p in params_by_id.items()}
    rows = collections.defaultdict(list)
    for logits, params in calls:
        for i, p in enumerate(params):
            if id(p) in ident:
                rows[ident[id(p)]].append(logits[i])
    return rows


def check_against_reference(engine, requests: dict, must_differ: set) -> dict:
    """Run `requests` (id -> (prompt, greedy params)) together; every chosen token must be the reference's argmax.
    For ids in `must_differ`, some step's choice must differ from the raw logits' argmax (the test can fail)."""
    calls, undo = record_sampler_inputs(engine)
    try:
        outs = run(engine, requests)
    finally:
        undo()
    rows = logits_per_request(calls, {rid: p for rid, (_, p) in requests.items()})
    for rid, (prompt, p) in requests.items():
        tokens = tokens_of(outs[rid])
        differs = False
        for step, token in enumerate(tokens):
            raw = rows[rid][step].tolist()
            expected = argmax(reference_logits(raw, p, prompt, tokens[:step], engine.eos_token_ids))
            assert token == expected, (rid, step, token, expected)
            differs |= expected != argmax(raw)
        assert differs or rid not in must_differ, f"{rid}: the parameter never changed a choice"
    return outs


def test_penalties_bias_and_allowed_ids_in_one_batch(engine):
    prompt = list(b"the cat sat on the mat and the cat")
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    requests = {
        "repetition": (prompt, SamplingParams(repetition_penalty=1.8, **greedy)),
        "frequency": (prompt, SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, **greedy)),
        "presence": (prompt[:5], SamplingParams(presence_penalty=2.0, **greedy)),
        "bias": (prompt, SamplingParams(logit_bias={ord("x"): 4.0, ord("y"): 3.0, ord("e"): -50.0}, **greedy)),
        "allowed": (prompt, SamplingParams(allowed_token_ids=list(b"abcdefghij"), **greedy)),
        "plain": (prompt, SamplingParams(**greedy)),
    }
    outs = check_against_reference(engine, requests, must_differ={"repetition", "frequency", "presence", "bias",
                                                                   "allowed"})
    assert set(tokens_of(outs["allowed"])) <= set(b"abcdefghij")


def test_penalty_rows_are_reused_after_requests_finish(engine):
    """More penalised requests over time than the table has rows at once: a reused row starts clean."""
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    for wave in range(3):
        requests = {f"w{wave}-{i}": (list(b"abab abab"), SamplingParams(frequency_penalty=2.0, **greedy))
                    for i in range(4)}
        outs = check_against_reference(engine, requests, must_differ=set())
        assert len({tuple(tokens_of(o)) for o in outs.values()}) == 1  # same prompt, same penalties, same output
    assert not engine.sampling.penalties.capacity or len(engine.sampling.penalties.free) == \
        engine.sampling.penalties.capacity


def test_min_tokens_holds_back_eos_and_stop_ids(engine):
    eos = engine.eos_token_ids[0]
    likely_eos = {eos: 100.0}  # EOS would be chosen at once
    outs = run(engine, {
        "free": (list(b"hi"), SamplingParams(temperature=0.0, max_tokens=20, logit_bias=likely_eos)),
        "held": (list(b"hi"), SamplingParams(temperature=0.0, max_tokens=20, logit_bias=likely_eos, min_tokens=5)),
        "stop_id": (list(b"hi"), SamplingParams(temperature=0.0, max_tokens=20, logit_bias={ord("q"): 100.0},
                                                stop_token_ids=[ord("q")], min_tokens=3)),
    })
    assert tokens_of(outs["free"]) == [eos] and outs["free"][-1].finish_reason == "stop"
    held = tokens_of(outs["held"])
    assert len(held) == 6 and eos not in held[:5] and held[5] == eos
    stop_id = tokens_of(outs["stop_id"])
    assert len(stop_id) == 4 and ord("q") not in stop_id[:3] and outs["stop_id"][-1].stop_reason == ord("q")


def test_min_tokens_holds_back_stop_strings(engine):
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={ord("z"): 100.0},
                       stop=["z"], min_tokens=4)
    out = run(engine, {"s": (list(b"hi"), p)})["s"]
    assert text_of(out) == "zzz" and out[-1].stop_reason == "z" and out[-1].num_output_tokens == 4


def test_bad_words_single_and_multi_token(engine):
    prompt = list(b"hello world")
    plain = tokens_of(run(engine, {"p": (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))})["p"])
    requests = {
        "one": (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                       bad_words_token_ids=[[plain[0]]])),
        "two": (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                       bad_words_token_ids=[plain[:2]])),
    }
    outs = check_against_reference(engine, requests, must_differ={"one", "two"})
    assert plain[0] not in tokens_of(outs["one"])
    two = tokens_of(outs["two"])
    assert two[0] == plain[0] and two[1] != plain[1]


def test_include_stop_str_and_skip_special_tokens(engine):
    eos = engine.eos_token_ids[0]
    stop = run(engine, {"s": (list(b"ab"), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                                          logit_bias={ord("k"): 100.0}, stop=["kk"],
                                                          include_stop_str_in_output=True))})["s"]
    assert text_of(stop) == "kk" and stop[-1].stop_reason == "kk"
    params = dict(temperature=0.0, max_tokens=3, ignore_eos=True, logit_bias={eos: 100.0})
    outs = run(engine, {"skip": (list(b"ab"), SamplingParams(**params)),
                        "keep": (list(b"ab"), SamplingParams(skip_special_tokens=False, **params))})
    special = engine.tokenizer.decode([eos], skip_special_tokens=False)
    assert text_of(outs["skip"]) == "" and text_of(outs["keep"]) == special * 3 and special


# ---- the sampler alone -------------------------------------------------------------------------------------------
def test_min_p_keeps_tokens_above_the_threshold():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1).contiguous()
    ids = Sampler(torch.device("cpu")).sample(logits, [SamplingParams(min_p=0.2)] * 4000, [None] * 4000)
    assert set(ids.sampled_ids.tolist()) == {0, 1, 2}  # 0.05 < 0.2 x 0.5


def test_processed_logprobs_are_the_distribution_sampled_from():
    """PROCESSED mode: logprobs after penalties and temperature equal the reference's log_softmax."""
    V = 40
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g) * 3
    state = PenaltyState(V, torch.device("cpu"), max_rows=4)
    prompt, outputs = [1, 2, 3], [4, 4, 7]
    row = state.acquire(prompt, outputs)
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, frequency_penalty=0.3, logprobs=2),
              SamplingParams(temperature=0.0, logit_bias={9: 50.0}, logprobs=0),
              SamplingParams(temperature=2.0, logprobs=1)]
    sampler = Sampler(torch.device("cpu"), logprobs_mode=LogprobsMode.PROCESSED, penalties=state)
    out = sampler.sample(logits, params, [None] * 3, SamplingExtras(penalty_rows=[row, -1, -1]))
    for i, p in enumerate(params):
        ref = torch.tensor(reference_logits(logits[i].tolist(), p, prompt if i == 0 else [],
                                            outputs if i == 0 else [], eos=[]), dtype=torch.float64)
        ref = torch.log_softmax(ref / (p.temperature if not p.greedy else 1.0), dim=-1)
        chosen = out.sampled_ids[i].item()
        assert out.logprobs.logprobs[i].item() == pytest.approx(ref[chosen].item(), abs=1e-4)
        assert out.logprobs.ranks[i].item() == int((ref > ref[chosen]).sum()) + 1
    assert out.sampled_ids[1].item() == 9  # greedy with the bias
    # the sample was recorded: row 0's count of its token went up by one
    assert state.counts[row, out.sampled_ids[0]].item() == outputs.count(out.sampled_ids[0].item()) + 1


def test_penalties_with_every_slot_taken_and_synchronous_steps():
    """max_num_seqs=1 with synchronous steps (--no-async-scheduling; every multi-rank model): a sequence's last
    token is read back at the end of its step, and the next request is admitted and samples in the next step. The
    finished sequence's penalty row must be free by then (it was handed back only when that token was emitted,
    after the next step sampled: 'more than 1 sequences use penalties at once', a failed engine)."""
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=1, async_scheduling=False))
    params = SamplingParams(max_tokens=3, presence_penalty=0.5, temperature=0.0, ignore_eos=True)
    outputs = run(engine, {"a": ([65, 66], params), "b": ([67, 68], params)}, max_steps=50)
    assert [len(tokens_of(outputs[r])) for r in "ab"] == [3, 3]
    assert sorted(engine.sampling.penalties.free) == [0]  # both rows handed back once, none twice
