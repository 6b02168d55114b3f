"""Issue 20's host-side structured-output pieces: the bitmask applied to logits (byte expansion, in place or on a
subset of rows) against a bit-by-bit reference, masks filled on the helper thread equal to masks filled at once
(and not changed by later steps), the batched grammar advance, and the engine's overlapped step (masks filling
while the read-back's tokens are detokenized) with stop strings finishing sequences in between."""

import re

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.logit_masks import apply_bitmask
from model.engine.sampling_state import SequenceSampling
from model.engine.sequence import Sequence
from model.engine.structured_output import GrammarMasks, compile_grammar, mask_threads
from model.byte_tokenizer import ByteTokenizer
from tests.engine_fixtures import one_cpu_thread, run, text_of  # noqa: F401

V = 300  # not a multiple of 32: the last word's high bits lie past the vocabulary
EOS = 258


def reference_allowed(words: torch.Tensor, vocab: int) -> list[list[bool]]:
    """Bit t % 32 of word t // 32, read with Python integers (the sign bit included)."""
    return [[bool((int(row[t // 32]) >> (t % 32)) & 1) for t in range(vocab)] for row in words]


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [2, 0], [3]], ids=["all-rows", "subset-unordered", "one"])
def test_apply_bitmask_matches_bit_by_bit_reference(rows):
    g = torch.Generator().manual_seed(len(rows))
    B = 4
    logits = torch.randn(B, V, generator=g)
    words = torch.randint(-(2**31), 2**31 - 1, (len(rows), (V + 31) // 32), dtype=torch.int32, generator=g)
    words[:, -1] |= -(1 << 31)  # bits past V set: they must not reach anything
    expected = logits.clone()
    for allowed, row in zip(reference_allowed(words, V), rows):
        for t in range(V):
            if not allowed[t]:
                expected[row, t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, rows, words)
    assert torch.equal(got, expected)
    untouched = [r for r in range(B) if r not in rows]
    assert torch.equal(got[untouched], logits[untouched])


def test_apply_bitmask_all_rows_allowed_and_none_allowed():
    logits = torch.randn(2, V)
    words = torch.zeros(2, (V + 31) // 32, dtype=torch.int32)
    words[0] = -1  # every bit
    got = logits.clone()
    apply_bitmask(got, [0, 1], words)
    assert torch.equal(got[0], logits[0])
    assert torch.isinf(got[1]).all() and (got[1] < 0).all()


def _matchers(n: int):
    tokenizer = ByteTokenizer()
    grammar = compile_grammar("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}},
                              tokenizer, V, [EOS])
    return [grammar.new_matcher() for _ in range(n)]


def test_each_fill_has_its_own_buffer_and_follows_the_matchers_states():
    """A step's masks stay as they were when the next step fills (the earlier buffer may still be in a copy), and
    the pool's masks equal one-thread masks."""
    masks, single = GrammarMasks(V, pin=False, num_threads=2), GrammarMasks(V, pin=False, num_threads=1)
    matchers = _matchers(5)
    for i, m in enumerate(matchers):  # different states: {, {", {"a", ...
        assert m.consume_tokens(list(b'{"a":1'[: i + 1]))
    first = masks.fill(matchers)
    assert torch.equal(first, single.fill(matchers))
    kept = first.clone()
    for m in matchers:  # the next step: advance and fill again
        m.consume_token(ord("}") if m.is_accepting() else ord("1"))
    again = masks.fill(matchers)
    assert torch.equal(first, kept) and not torch.equal(again, kept)
    allowed = reference_allowed(kept, V)
    assert allowed[0][ord('"')] and not allowed[0][ord("x")]  # after "{": a key's quote, nothing else of those


def test_mask_threads_use_more_than_llguidance_default_on_small_machines():
    assert mask_threads() >= 2


def test_advance_grammars_completes_and_rejects():
    sampling = SequenceSampling(V, torch.device("cpu"), 4, [EOS])
    tokenizer = ByteTokenizer()
    grammar = compile_grammar("regex", "ab", tokenizer, V, [EOS])
    seqs = []
    for i in range(3):
        seq = Sequence(f"r{i}", [1], SamplingParams(grammar=grammar), i)
        sampling.on_add(seq)
        seqs.append(seq)
    free = Sequence("free", [1], SamplingParams(), 3)
    assert sampling.advance_grammars([(seqs[0], ord("a")), (seqs[1], ord("a")), (seqs[2], ord("z")),
                                      (free, 5)]) == {seqs[2]}  # "z": rejected, stopped
    assert sampling.advance_grammars([(seqs[0], ord("b")), (seqs[1], ord("a"))]) == {seqs[0], seqs[1]}
    assert seqs[0].matcher.is_stopped() and not seqs[0].matcher.is_error()
    assert seqs[1].matcher.is_error()
    # a rejected token marks its sequence as failed (the engine ends it with an error, not "stop")
    assert seqs[0].error is None and free.error is None
    assert seqs[1].error[0] == seqs[2].error[0] == "structured_output_failed"


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=True))


def test_a_grammar_that_breaks_mid_output_ends_with_an_error_not_stop(engine, monkeypatch):
    """What the engine does when a grammar fails on a sampled token (the grammar engine hit its limits on that
    path, or a mask was wrong; simulated by dropping the masks): the sequence ends with finish_reason "error", and
    the rejected token is not part of its output, which a "stop" would report as a complete structured output."""
    real = engine.sampling.extras

    def unmasked(seqs):
        extras = real(seqs)
        extras.grammar_rows, extras.grammar_bitmask = [], None
        return extras

    monkeypatch.setattr(engine.sampling, "extras", unmasked)
    g = compile_grammar("regex", "ab", engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    outs = run(engine, {"r": ([120], SamplingParams(max_tokens=5, temperature=0.0, allowed_token_ids=[97], grammar=g))})
    assert [t for o in outs["r"] for t in o.new_token_ids] == [97]  # "a", then "a" again: rejected, not output
    assert outs["r"][-1].finish_reason == "error" and outs["r"][-1].error[0] == "structured_output_failed"
    assert not engine.has_unfinished_requests()


def test_grammars_with_stop_strings_under_asynchronous_scheduling(engine):
    """Stop strings end constrained sequences cleanly (a stop found after the next step was launched drops that
    step's token); the others keep matching their grammar to the end."""
    tokenizer = engine.tokenizer
    g = compile_grammar("regex", "[a-d]{1,60}", tokenizer, engine.model_config.vocab_size, engine.eos_token_ids)
    requests = {f"stop{s}": (list(b"go"), SamplingParams(max_tokens=80, temperature=1.0, seed=s, grammar=g,
                                                         stop=["a"])) for s in range(4)}
    requests.update({f"free{s}": (list(b"go"), SamplingParams(max_tokens=80, temperature=1.0, seed=10 + s, grammar=g))
                     for s in range(4)})
    outs = run(engine, requests)
    for rid, out in outs.items():
        text = text_of(out)
        assert out[-1].finish_reason == "stop", (rid, text)
        if rid.startswith("stop"):
            assert re.fullmatch(r"[b-d]{0,60}", text), (rid, text)
        else:
            assert re.fullmatch(r"[a-d]{1,60}", text), (rid, text)
    assert any(len(text_of(o)) < 60 for r, o in outs.items() if r.startswith("stop"))


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [list(range(64)), list(range(8, 16))], ids=["all-rows", "subset"])
def test_apply_bitmask_on_the_gpu_matches_the_cpu_and_makes_no_host_sync(rows):
    """The device path (pinned words, byte expansion, in-place fill) against the CPU result of the same call, which
    the bit-by-bit test above checks; CUDA's sync debug mode turns any host synchronisation into an error."""
    g = torch.Generator().manual_seed(0)
    B, vocab = 64, 151936
    logits = torch.randn(B, vocab, generator=g)
    words = torch.randint(-(2**31), 2**31 - 1, (len(rows), (vocab + 31) // 32), dtype=torch.int32, generator=g)
    expected = logits.clone()
    apply_bitmask(expected, rows, words)
    device_logits = logits.cuda()
    pinned = words.pin_memory()
    apply_bitmask(device_logits, rows, pinned)  # warm-up: the bit table is made on the device once
    device_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_bitmask(device_logits, rows, pinned)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(device_logits.cpu(), expected)
