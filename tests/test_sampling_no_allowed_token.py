"""A row whose constraints leave no token allowed (allowed_token_ids all banned, only EOS allowed while min_tokens
bans it, a grammar that allows none of allowed_token_ids): the sampler flags it on the device with the sample (no
host sync), and the engine ends that sequence with finish_reason "error" instead of emitting the meaningless id
that argmax of an all -inf row gives (token 0, outside every constraint)."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.sampler import Sampler, SamplingExtras
from model.engine.structured_output import compile_grammar
from tests.engine_fixtures import one_cpu_thread, run, tokens_of  # noqa: F401

V = 32


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sampler_flags_rows_with_no_allowed_token(temperature):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=temperature, allowed_token_ids=[5]),  # 5 is banned below: nothing left
              SamplingParams(temperature=temperature, allowed_token_ids=[5, 6]),
              SamplingParams(temperature=temperature)]
    out = Sampler(torch.device("cpu")).sample(logits, params, [None] * 3, SamplingExtras(banned=[(0, 5), (1, 5)]))
    assert out.no_token.tolist() == [True, False, False]
    assert out.sampled_ids[1].item() == 6


def test_no_flags_when_no_row_is_masked():
    out = Sampler(torch.device("cpu")).sample(torch.randn(2, V), [SamplingParams()] * 2, [None] * 2)
    assert out.no_token is None


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def engine(request):
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64,
                                  async_scheduling=request.param))


def test_a_sequence_with_no_allowed_token_ends_with_an_error_and_no_token(engine):
    grammar = compile_grammar("regex", "ab", engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    contradictions = {
        "banned": SamplingParams(max_tokens=5, temperature=1.0, seed=1, allowed_token_ids=[98],
                                 bad_words_token_ids=[[98]]),
        "min_tokens": SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[256], min_tokens=3),
        "grammar": SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[98], grammar=grammar),
    }
    requests = {rid: ([120], p) for rid, p in contradictions.items()}
    ac = compile_grammar("regex", "ac", engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    requests["late"] = ([120], SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[97, 98], grammar=ac))
    requests["free"] = ([120], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    outs = run(engine, requests)
    for rid in contradictions:
        last = outs[rid][-1]
        assert last.finish_reason == "error" and last.error[0] == "no_allowed_token", (rid, last)
        assert tokens_of(outs[rid]) == [], rid  # never token 0 (what argmax of an all -inf row gives)
    # "late": "a" satisfies both; then the grammar wants "c", which allowed_token_ids excludes
    assert tokens_of(outs["late"]) == [97] and outs["late"][-1].finish_reason == "error"
    assert "output token 2" in outs["late"][-1].error[1]
    assert len(tokens_of(outs["free"])) == 6 and outs["free"][-1].finish_reason == "length"
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.usage == 0  # the failed sequences' blocks went back
