"""Structured output: token masks from a grammar engine (llguidance) that every sampled token must satisfy.

Why llguidance: a Rust library with one abi3 wheel per platform (any CPython >= 3.10) and no Python dependencies
(xgrammar pulls in transformers, triton and apache-tvm-ffi; outlines-core compiles a whole-vocabulary index per
schema up front and has no context-free grammars). It reads our tokenizers directly (tokenizer.json, or the byte
table of the byte tokenizer), supports JSON Schema, regular expressions, Lark/GBNF grammars and choices (vLLM's
`structured_outputs` kinds), computes masks with the GIL released on its own thread pool, and is the "guidance"
backend of vLLM and SGLang. A mask takes ~70 us to ~0.6 ms with a 100k-token vocabulary (see GrammarMasks).

Flow: the service compiles a request's grammar once (`compile_grammar`, on its tokenizer threads; a bad schema is a
400 there) into a `Grammar` holding a matcher in its start state; each sequence gets a deep copy. The engine fills
one bitmask row per constrained sequence just before sampling — after launching the step's forward pass, so the
host computes masks while the device runs the model — and the sampler applies the bitmask on the device
(model/engine/logit_masks.py). Once a grammar is complete (only EOS could follow), the sequence stops.

Cost bounds (`LIMITS`): llguidance builds a grammar's lexer lazily, at the first mask, and its defaults let one
crafted regex spend over a second there (`(a{1000}){1001}`: 1.1-1.4 s on one CPU core, then a failure at the
first token). So `Grammar` computes the first mask and takes one probe step when it is compiled, on the tokenizer
threads, under limits about ten times tighter than llguidance's: a grammar that is unsatisfiable or exceeds them is
a `GrammarError` (a 400) before it reaches the engine thread, and every later mask runs under the same per-step
limits (a grammar that exceeds them mid-output fails that sequence only; llm_engine.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import threading

import llguidance
import torch
from llguidance import LLExecutor, LLMatcher, LLParserLimits, LLTokenizer, TokenizerWrapper

logger = logging.getLogger(__name__)

# Kinds of constraint: JSON Schema (a dict), any JSON object, a regular expression, a Lark or GBNF grammar, one of a
# list of strings.
KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
_COMPACT_JSON = {"whitespace_flexible": False}  # no free whitespace: random weights would fill it forever
_lock = threading.Lock()
# llguidance's defaults / 10 (lexer build, per-mask lexer work, lexer states) and / 2.5 (Earley items per mask).
# Measured on one core of the CPU machine: the lexer build of `(a{1000}){1001}` is bounded to ~0.1 s (1.1-1.4 s
# with the defaults), a recursive schema's first mask to ~30 ms (50-90 ms); a 60-property JSON schema, regexes and
# JSON objects with a 50k-token BPE compile and run unchanged (tests/test_structured_limits.py).
LIMITS = LLParserLimits(initial_lexer_fuel=100_000, step_lexer_fuel=100_000, step_max_items=20_000,
                        max_lexer_states=50_000, verbose_errors=False)


class GrammarError(ValueError):
    """The grammar or schema is invalid (the message says why)."""


class GrammarUnavailable(GrammarError):
    """The grammar engine cannot index this tokenizer's vocabulary, so no constraint can be enforced."""


class _ByteVocabulary:
    """The byte tokenizer (model/byte_tokenizer.py) as llguidance's TokenizerWrapper wants it: each id's bytes.
    Ids past its vocabulary (a random-weight preset's larger one) are unnamed special tokens no grammar allows."""

    def __init__(self, tokenizer, vocab_size: int):
        specials = sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
        self.tokens = [bytes([i]) for i in range(256)] + [name.encode() for name, _ in specials]
        self.special_token_ids = [i for _, i in specials] + list(range(len(self.tokens), vocab_size))
        self.tokens += [f"<|unused_{i}|>".encode() for i in range(len(self.tokens), vocab_size)]
        self.eos_token_id = tokenizer.eos_token_ids[0]
        self.bos_token_id = None

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """The tokenizer's llguidance twin over the model's vocabulary (ids past the tokenizer's are never allowed),
    built once per tokenizer (about a second for 150k tokens) and cached on it."""
    with _lock:
        cached = getattr(tokenizer, "_llguidance", None)
        if cached is None or cached[0] != vocab_size:
            cached = (vocab_size, _index_vocabulary(tokenizer, vocab_size, eos_token_ids))
            tokenizer._llguidance = cached  # a failure too: indexing 150k tokens again per request takes seconds
        if isinstance(cached[1], GrammarUnavailable):
            raise cached[1]
        return cached[1]


def _index_vocabulary(tokenizer, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer | GrammarUnavailable:
    try:
        ll = _llg_tokenizer(lambda: tokenizer.backend_json() if hasattr(tokenizer, "backend_json") else
                            TokenizerWrapper(_ByteVocabulary(tokenizer, vocab_size)), vocab_size, eos_token_ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 — llguidance's Rust asserts surface as pyo3's PanicException, a
        # BaseException: e.g. a token longer than its trie allows (seen with a BPE trained on code: 1497 bytes)
        return GrammarUnavailable(f"structured output is unavailable with this model's tokenizer: the grammar "
                                  f"engine could not index its vocabulary ({type(err).__name__}: {str(err)[:200]})")
    if ll.vocab_size != vocab_size:
        return GrammarUnavailable(f"structured output is unavailable with this model's tokenizer: the grammar "
                                  f"engine sees {ll.vocab_size} tokens, the model {vocab_size}")
    return ll


def _llg_tokenizer(source, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """LLTokenizer over `source()` with every EOS id; llguidance before 1.7 takes one EOS id only (a TypeError for a
    list; the GPU image's wheel was 1.6.1 once), and then a completed grammar ends with the first one."""
    vocabulary = source()
    if len(eos_token_ids) > 1 and not _takes_eos_lists():
        logger.warning("llguidance %s takes one EOS id: structured output ends with token %d only (of %s)",
                       importlib.metadata.version("llguidance"), eos_token_ids[0], list(eos_token_ids))
        return LLTokenizer(vocabulary, n_vocab=vocab_size, eos_token=int(eos_token_ids[0]))
    return LLTokenizer(vocabulary, n_vocab=vocab_size, eos_token=list(eos_token_ids))


def _takes_eos_lists() -> bool:
    """Whether this llguidance's LLTokenizer takes a list of EOS ids (1.7 on; its stub says so)."""
    version = importlib.metadata.version("llguidance")  # 1.6 has no __version__
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= (1, 7)
    except ValueError:
        return True  # a development build: assume the current signature


def grammar_text(kind: str, spec) -> str:
    """llguidance's grammar for a constraint of `kind` (see KINDS)."""
    try:
        if kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(spec, defaults=_COMPACT_JSON)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT_JSON)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec)
        if kind == "grammar":
            return llguidance.grammar_from("grammar", spec)
        if kind == "choice":
            if not spec or not all(isinstance(s, str) and s for s in spec):
                raise GrammarError("choice must be a non-empty list of non-empty strings")
            return LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(s) for s in spec))
    except Exception as err:  # the converters raise ValueError or their own errors on malformed text
        raise GrammarError(str(err)) from None
    raise GrammarError(f"unknown constraint kind {kind!r}")


def grammar_after(prefix_lark: str, answer: str) -> str:
    """One grammar: the Lark rules `prefix_lark`, whose rule `start` refers to the answer as `@answer`, and the
    grammar `answer` (a `grammar_text`). The answer is a separate llguidance grammar with its own rule names and
    lexer, so any answer composes (a client's Lark grammar may name its rules as the prefix does)."""
    if answer.lstrip().startswith("{"):  # a top-level grammar (JSON schema, regex): its first grammar is the answer
        grammars = json.loads(answer)["grammars"]
        grammars[0] = {**grammars[0], "name": "answer"}
    else:  # Lark text
        grammars = [{"name": "answer", "lark_grammar": answer}]
    return json.dumps({"grammars": [{"name": "prefix", "lark_grammar": prefix_lark}, *grammars]}, ensure_ascii=False)


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def matcher_error(matcher: LLMatcher) -> str:
    """The matcher's error, for a client: llguidance's text without its state dump marker."""
    text = matcher.get_error().replace("<non-verbose/>", "").strip()
    if text.startswith("NoExtensionBias"):
        return "no output can satisfy this constraint"
    return text


class Grammar:
    """A compiled constraint: a matcher in its start state, copied for every sequence that uses it.

    Made on the tokenizer threads: the first mask is computed here (which builds the lexer, the costly part), and
    a copy takes one step with the first token it allows, so a grammar that cannot produce anything or exceeds
    `LIMITS` on its first step is a GrammarError here, not a stall or a failure on the engine thread.

    Copies share the compiled lexer behind one lock: the masks of 64 copies of one Grammar fill one at a time
    whatever llguidance's pool size (CPU time / wall time 1.00 with 2 threads, against 1.5-1.8 for 64 separately
    compiled requests; benchmarks/NOTES.md, issue 20). Hence one compilation per request, and no cache of compiled
    grammars across requests: it would serialise the masks of every request with the same schema."""

    def __init__(self, text: str, tokenizer: LLTokenizer, description: str):
        self.text = text
        self.description = description
        self._start = LLMatcher(tokenizer, text, log_level=0, limits=LIMITS)
        self._probe(tokenizer)
        if self._start.is_error():
            raise GrammarError(matcher_error(self._start))

    def _probe(self, tokenizer: LLTokenizer) -> None:
        """First mask, then one step on a copy (copies share the lexer, so this warms it too): an error in either
        (unsatisfiable, or over LIMITS: e.g. a lexer that ran out of fuel building itself) is a GrammarError."""
        if self._start.is_error():
            return
        mask = self._start.compute_bitmask()
        if self._start.is_error():
            return
        eos = set(tokenizer.eos_tokens if hasattr(tokenizer, "eos_tokens") else [tokenizer.eos_token])
        token = _first_allowed(mask, eos)
        if token is None:
            return  # only EOS: the empty output is complete
        probe = self._start.deep_copy()
        if probe.consume_token(token) and not probe.is_stopped():
            probe.compute_bitmask()
        if probe.is_error():
            raise GrammarError(f"exceeds the structured-output engine's limits after its first token "
                               f"({matcher_error(probe)})")

    def new_matcher(self) -> LLMatcher:
        return self._start.deep_copy()


def _first_allowed(mask: bytes, exclude: set[int]) -> int | None:
    """The lowest token id whose bit is set in an llguidance bitmask (bit t % 8 of byte t // 8), outside `exclude`."""
    for i, byte in enumerate(mask):
        while byte:
            low = byte & -byte
            token = i * 8 + low.bit_length() - 1
            if token not in exclude:
                return token
            byte ^= low
    return None


def allows_only(mask: torch.Tensor, token_ids: list[int]) -> bool:
    """Whether a bitmask row ([ceil(V / 32)] int32, GrammarMasks.fill's layout) allows no token outside
    `token_ids`. Read as bytes: token t is bit t % 8 of byte t // 8 (little-endian words)."""
    others = mask.view(torch.uint8).clone()
    for t in token_ids:
        others[t // 8] &= ~(1 << (t % 8)) & 0xFF
    return not bool(others.any())


def compile_grammar(kind: str, spec, tokenizer, vocab_size: int, eos_token_ids: list[int],
                    prefix_lark: str | None = None) -> Grammar:
    """The constraint (kind, spec), after the text `prefix_lark` matches when given (see grammar_after)."""
    ll = grammar_tokenizer(tokenizer, vocab_size, eos_token_ids)
    text = grammar_text(kind, spec)  # a bad schema fails here, in its own terms
    if prefix_lark is not None:
        text = grammar_after(prefix_lark, text)
    error = LLMatcher.validate_grammar(text, ll, limits=LIMITS)
    if error:
        raise GrammarError(error.replace("<non-verbose/>", "").strip())
    return Grammar(text, ll, kind)


def mask_threads() -> int:
    """llguidance's pool size: every usable CPU but one (the engine thread's). llguidance's own default is 80% of the
    CPUs, 1 on a 2-core machine, where 2 threads fill 64 masks 1.8x faster (benchmarks/NOTES.md, issue 20); while
    the pool works, the engine thread waits for it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(2, min(32, cpus - 1))


class GrammarMasks:
    """Fills the bitmasks of a step's constrained rows on llguidance's thread pool (the GIL is released).

    Measured with a 100k-token BPE and a 152k-token model vocabulary (benchmarks/NOTES.md, issue 20): a mask costs
    0.3 ms (bench_api_costs' JSON schema) to 0.6 ms (its regex `[a-z ]{0,1024}`, which llguidance's slicer cannot
    shortcut) on one core of the 2-core CPU machine: 64 of them are 18-39 ms of CPU per step, as long as a decode
    forward pass, hence the pool and the overlap.

    Each step allocates its own buffer: on CUDA it comes pinned from PyTorch's caching host allocator, which after
    the first steps hands back a block whose last non_blocking copy has completed (it records an event on the copy's
    stream and checks it before reuse), so no cudaHostAlloc per step and no buffer overwritten under an in-flight
    copy; on the CPU an allocation of 64 x 4748 words is a few microseconds."""

    def __init__(self, vocab_size: int, pin: bool, num_threads: int | None = None):
        self.words = (vocab_size + 31) // 32
        self.pin = pin
        self.num_threads = num_threads or mask_threads()
        self._executor: LLExecutor | None = None  # started on first use

    def fill(self, matchers: list[LLMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 host tensor: bit t % 32 of word t // 32 = token t allowed."""
        if self._executor is None:
            self._executor = LLExecutor(num_threads=self.num_threads)
        masks = torch.empty(len(matchers), self.words, dtype=torch.int32, pin_memory=self.pin)
        if matchers:
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], masks.data_ptr(),
                                                   self.words * 4, len(matchers))
        return masks
