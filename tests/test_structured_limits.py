"""Structured output's cost bounds (model/engine/structured_output.py LIMITS): a grammar is compiled with its first
mask and one probe step, under llguidance limits, on the caller's thread (the service's tokenizer threads). A grammar
that is unsatisfiable or too costly is a GrammarError there, quickly, instead of holding the engine thread (with
llguidance's defaults the first mask of `(a{1000}){1001}` took 1.1-1.4 s there, then failed at the first token);
ordinary grammars are unaffected."""

import time

import pytest

from model.byte_tokenizer import ByteTokenizer
from model.engine.structured_output import GrammarError, compile_grammar

V, EOS = 259, [258, 256]

TOO_COSTLY = [
    ("regex", "(a{1000}){1000}"),  # the lexer runs out of fuel building itself
    ("regex", "(a{1000}){1017}"),
    ("json_schema", {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}),  # Earley items
]
UNSATISFIABLE = [
    ("grammar", "start: start"),
    ("json_schema", {"$ref": "#"}),
    ("regex", "[^\\x00-\\U0010FFFF]"),
]
ORDINARY = [
    ("regex", "(a{100}){100}"),
    ("regex", "[a-z ]{0,1024}"),
    ("regex", "ab"),
    ("json_object", None),
    ("choice", ["yes", "no"]),
    ("grammar", 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'),
    ("json_schema", {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 40} if i % 2 else
                                                      {"enum": ["alpha", "beta", f"v{i}"]} for i in range(60)},
                     "required": [f"f{i}" for i in range(0, 60, 3)]}),
]


def compile_(kind, spec):
    return compile_grammar(kind, spec, ByteTokenizer(), V, EOS)


@pytest.mark.parametrize("kind,spec", TOO_COSTLY, ids=lambda v: str(v)[:24])
def test_a_grammar_beyond_the_limits_is_refused_when_compiled_and_quickly(kind, spec):
    started = time.perf_counter()
    with pytest.raises(GrammarError, match="limits"):
        compile_(kind, spec)
    assert time.perf_counter() - started < 0.5  # llguidance's defaults: > 1 s of lexer building


@pytest.mark.parametrize("kind,spec", UNSATISFIABLE, ids=lambda v: str(v)[:24])
def test_an_unsatisfiable_grammar_is_refused_when_compiled(kind, spec):
    with pytest.raises(GrammarError, match="no output can satisfy"):
        compile_(kind, spec)


@pytest.mark.parametrize("kind,spec", ORDINARY, ids=lambda v: str(v)[:24])
def test_ordinary_grammars_compile_and_their_first_mask_is_ready(kind, spec):
    grammar = compile_(kind, spec)
    matcher = grammar.new_matcher()
    started = time.perf_counter()
    matcher.compute_bitmask()  # the lexer was built at compile time: the engine's first mask is cheap
    assert time.perf_counter() - started < 0.05 and not matcher.is_error()
