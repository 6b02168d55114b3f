"""Sampling hunt (session 27): min_tokens against a grammar that is already complete.

docs/service.md ("Structured output"): once the grammar is complete the sequence stops with finish_reason "stop",
even before min_tokens. A grammar whose only output is the empty one (regex "", Lark `start: ""`) is complete
before any token: its mask allows EOS alone, and min_tokens banned that EOS, so the row had no token at all and the
request failed with no_allowed_token instead of returning its (empty) complete output."""

import pytest
import torch

from model.byte_tokenizer import ByteTokenizer
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.sampling_state import SequenceSampling
from model.engine.sequence import Sequence
from model.engine.structured_output import compile_grammar
from tests.engine_fixtures import one_cpu_thread, run, text_of, tokens_of  # noqa: F401

V, EOS = 259, 256


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def engine(request):
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=4, max_num_batched_tokens=64,
                                  async_scheduling=request.param))


def grammar(engine, kind, spec):
    return compile_grammar(kind, spec, engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)


@pytest.mark.parametrize("kind, spec", [("regex", ""), ("grammar", 'start: ""')])
def test_a_grammar_complete_before_any_token_stops_despite_min_tokens(engine, kind, spec):
    params = SamplingParams(max_tokens=6, min_tokens=3, temperature=0.0, grammar=grammar(engine, kind, spec))
    out = run(engine, {"r": (list(b"hi"), params)})["r"]
    assert out[-1].error is None and out[-1].finish_reason == "stop", out[-1]
    assert text_of(out) == "" and set(tokens_of(out)) <= set(engine.eos_token_ids)
    assert not engine.has_unfinished_requests()


def test_min_tokens_still_holds_eos_back_while_the_grammar_can_go_on(engine):
    """"(ab)?" may end at once or write "ab": min_tokens must keep EOS banned, so the output is "ab"."""
    eos_first = {t: 100.0 for t in engine.eos_token_ids}  # greedy would end at once without the ban
    params = SamplingParams(max_tokens=6, min_tokens=2, temperature=0.0, logit_bias=eos_first,
                            grammar=grammar(engine, "regex", "(ab)?"))
    out = run(engine, {"r": (list(b"hi"), params)})["r"]
    assert text_of(out) == "ab" and out[-1].finish_reason == "stop" and out[-1].error is None


def test_extras_lift_the_eos_ban_only_for_rows_whose_mask_allows_nothing_else():
    tokenizer = ByteTokenizer()
    sampling = SequenceSampling(V, torch.device("cpu"), 4, [EOS])
    seqs = []
    for i, spec in enumerate(["", "(ab)?", "a"]):
        p = SamplingParams(min_tokens=2, stop_token_ids=[ord("q")],
                           grammar=compile_grammar("regex", spec, tokenizer, V, [EOS]))
        seqs.append(Sequence(f"r{i}", [1], p, i))
        sampling.on_add(seqs[-1])
    plain = Sequence("plain", [1], SamplingParams(min_tokens=2), 3)
    banned = set(sampling.extras([*seqs, plain]).banned)
    assert (0, EOS) not in banned and (0, ord("q")) in banned  # complete: EOS may end it
    assert {(1, EOS), (2, EOS), (3, EOS)} <= banned  # "ab" or "a" can still come; no grammar
