"""Structured output on the engine: with random weights, every constrained output matches its grammar (parses
and validates against the JSON schema, or matches the regex / choice), sampled and greedy, in a batch with
unconstrained sequences, with and without asynchronous scheduling."""

import json
import re

import jsonschema
import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.structured_output import GrammarError, compile_grammar
from tests.engine_fixtures import one_cpu_thread, run, text_of, tokens_of  # noqa: F401

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                               "maxItems": 2},
                                      "score": {"type": "number", "minimum": -5, "maximum": 5}},
     "required": ["ok", "tags"], "additionalProperties": False},
]


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def engine(request):
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64,
                                  async_scheduling=request.param))


def grammar(engine, kind, spec):
    return compile_grammar(kind, spec, engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)


def test_json_schemas_validate_with_random_weights(engine):
    requests = {}
    for i, schema in enumerate(SCHEMAS):
        g = grammar(engine, "json_schema", schema)
        for seed in range(3):
            requests[f"s{i}-{seed}"] = (list(b"json: "), SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                                                                        grammar=g))
        requests[f"g{i}"] = (list(b"x"), SamplingParams(max_tokens=120, temperature=0.0, grammar=g))
    requests["free"] = (list(b"free"), SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True))
    outs = run(engine, requests)
    for rid, out in outs.items():
        if rid == "free":
            assert len(tokens_of(out)) == 30
            continue
        schema = SCHEMAS[int(rid[1])]
        assert out[-1].finish_reason == "stop", (rid, text_of(out))
        jsonschema.validate(json.loads(text_of(out)), schema)


def test_regex_choice_json_object_and_grammar(engine):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    cases = {
        "regex": (grammar(engine, "regex", r"[a-c]{2,5}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2,5}-\d{3}", t)),
        "choice": (grammar(engine, "choice", ["apple", "pear", "fig"]), lambda t: t in ("apple", "pear", "fig")),
        "object": (grammar(engine, "json_object", None), lambda t: isinstance(json.loads(t), dict)),
        "lark": (grammar(engine, "grammar", lark), lambda t: re.fullmatch(r"\((\d+)(\+\d+)*\)", t)),
        "gbnf": (grammar(engine, "grammar", gbnf), lambda t: t in ("yes", "no", "maybe")),
    }
    requests = {f"{name}-{seed}": (list(b"go"), SamplingParams(max_tokens=300, temperature=1.0, seed=seed, grammar=g))
                for name, (g, _) in cases.items() for seed in range(3)}
    outs = run(engine, requests)
    for rid, out in outs.items():
        text = text_of(out)
        assert out[-1].finish_reason == "stop", (rid, text)
        assert cases[rid.rsplit("-", 1)[0]][1](text), (rid, text)


def test_json_object_is_not_sampled_without_the_grammar(engine):
    """The check above can fail: the same seeds without a grammar give no JSON."""
    outs = run(engine, {f"u{s}": (list(b"go"), SamplingParams(max_tokens=40, temperature=1.0, seed=s))
                        for s in range(3)})
    for out in outs.values():
        with pytest.raises(ValueError):
            json.loads(text_of(out))


@pytest.mark.parametrize("kind,spec", [("json_schema", {"type": "nonsense"}), ("regex", "[a-"),
                                       ("grammar", "start: undefined_rule"), ("choice", [])])
def test_bad_grammars_raise(engine, kind, spec):
    with pytest.raises(GrammarError):
        grammar(engine, kind, spec)


def test_grammar_over_a_bpe_tokenizer(tmp_path):
    """A real BPE vocabulary (multi-byte tokens, merges across JSON punctuation): walking random allowed tokens of the
    grammar's masks always spells a valid document, and token_bytes spells the same text as decode."""
    import random

    from model.engine.structured_output import GrammarMasks
    from model.tokenizer import HFTokenizer
    from tests.model_fixtures import make_tokenizer_files

    make_tokenizer_files(tmp_path)
    tok = HFTokenizer(tmp_path)
    vocab = tok.vocab_size + 13  # a model vocabulary larger than the tokenizer's: the extra ids are never allowed
    eos = tok.eos_token_ids
    g = compile_grammar("json_schema", SCHEMAS[2], tok, vocab, eos)
    masks = GrammarMasks(vocab, pin=False)
    rng = random.Random(0)
    for _ in range(5):
        matcher, ids = g.new_matcher(), []
        while not matcher.is_stopped() and len(ids) < 400:
            words = masks.fill([matcher])[0]
            allowed = [t for t in range(vocab) if (int(words[t // 32]) >> (t % 32)) & 1]
            assert allowed and max(allowed) < tok.vocab_size
            token = rng.choice(allowed)
            assert matcher.consume_token(token)
            ids.append(token)
        text = tok.decode([t for t in ids if t not in eos])
        jsonschema.validate(json.loads(text), SCHEMAS[2])
        assert b"".join(tok.token_bytes(t) for t in ids if t not in eos).decode() == text


def test_a_grammar_engine_taking_one_eos_id_gets_the_first(tmp_path, monkeypatch):
    """llguidance before 1.7 takes `eos_token` as one int (the GPU image's wheel was 1.6.1: every structured request
    of a model with two EOS ids got a 400). The vocabulary is then indexed with the first EOS id."""
    from model.engine import structured_output
    from model.tokenizer import HFTokenizer
    from tests.model_fixtures import make_tokenizer_files

    real = structured_output.LLTokenizer
    calls = []

    def one_eos_only(source, n_vocab, eos_token):  # 1.6.1's signature: eos_token: Optional[int]
        calls.append(eos_token)
        if isinstance(eos_token, list):
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        return real(source, n_vocab=n_vocab, eos_token=eos_token)

    monkeypatch.setattr(structured_output, "LLTokenizer", one_eos_only)
    monkeypatch.setattr(structured_output.importlib.metadata, "version", lambda name: "1.6.1")
    make_tokenizer_files(tmp_path)
    tok = HFTokenizer(tmp_path)
    eos = [tok.eos_token_ids[0], 3]
    g = compile_grammar("regex", "ab", tok, tok.vocab_size, eos)
    assert calls == [eos[0]]
    matcher = g.new_matcher()
    for t in tok.encode("ab"):
        assert matcher.consume_token(t)
    assert matcher.consume_token(eos[0]) and matcher.is_stopped()
