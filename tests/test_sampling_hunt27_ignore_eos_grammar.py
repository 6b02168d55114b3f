"""Sampling hunt (session 27): fixed in model/engine/llm_engine.py (`_read_back`).

With ignore_eos a grammar that allows EOS (regex "a{1,8}" after "a") can sample it; the grammar is then complete
and the engine stops the sequence as a complete output whose last token is text (`stopped_after_text`). But that
last token is EOS: with skip_special_tokens=False (the harmony chat path, or a client's choice) its "<|endoftext|>"
lands in the text, which no longer matches the grammar ("a<|endoftext|>" for a{1,8}). Without ignore_eos the same
EOS ends the sequence as a stop token and stays out of the text. Now a grammar completed by an EOS id stops like a
stop token."""

import re

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.structured_output import compile_grammar
from tests.engine_fixtures import one_cpu_thread, run, text_of  # noqa: F401


def test_an_eos_completing_a_grammar_under_ignore_eos_is_not_text():
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=2))
    g = compile_grammar("regex", "a{1,8}", engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    eos_likely = {t: 100.0 for t in engine.eos_token_ids}
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=ignore_eos, skip_special_tokens=False,
                                grammar=g, logit_bias=eos_likely)
        out = run(engine, {"r": (list(b"hi"), params)})["r"]
        assert out[-1].finish_reason == "stop"
        assert re.fullmatch("a{1,8}", text_of(out)), (ignore_eos, text_of(out))
