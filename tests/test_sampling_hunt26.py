"""Sampling and stopping hunt (session 26): each test checks the engine's sampler, stop conditions or detokenizer
against a reference written here from the definitions (numpy, plain Python), never against the code under test."""

import random

import numpy as np
import pytest
import torch

from model.byte_tokenizer import ByteTokenizer
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.detokenizer import IncrementalDetokenizer, check_stop
from model.engine.logprobs import LogprobsMode
from model.engine.sampler import Sampler
from model.engine.sequence import Sequence
from tests.engine_fixtures import one_cpu_thread, run, tokens_of  # noqa: F401


def reference_processed_logprobs(logits: list[float], temperature: float, min_p: float, top_k: int,
                                 top_p: float) -> np.ndarray:
    """vLLM's order: temperature, min_p (against the most likely token), top-k, then top-p over the renormalised
    rest (keep the most likely tokens until their mass reaches top_p), log_softmax of what is left."""
    x = np.asarray(logits, dtype=np.float64) / temperature

    def softmax(v):
        e = np.exp(v - v.max())
        return e / e.sum()

    p = softmax(x)
    x = np.where(p < min_p * p.max(), -np.inf, x)
    if top_k > 0:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)  # ties: none with random logits
    p, kept, mass = softmax(x), np.zeros(len(x), bool), 0.0
    for i in np.argsort(-p, kind="stable"):
        if mass >= top_p:
            break
        kept[i], mass = True, mass + p[i]
    x = np.where(kept, x, -np.inf)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_greedy_processed_logprobs_do_not_depend_on_the_batch():
    """A greedy row with top-k / min_p / top-p under --logprobs-mode processed_logprobs: docs/service.md says its
    distribution is the cut one, without temperature. It was cut only when a random row shared the batch; alone (or
    with greedy rows only) it reported the uncut log_softmax."""
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)) * 2
    greedy = SamplingParams(temperature=0.0, top_k=4, min_p=0.05, top_p=0.9, logprobs=3)
    ref = reference_processed_logprobs(logits[0].tolist(), 1.0, 0.05, 4, 0.9)
    sampler = Sampler(torch.device("cpu"), logprobs_mode=LogprobsMode.PROCESSED)
    alone = sampler.sample(logits[:1], [greedy], [None]).logprobs
    mixed = sampler.sample(logits, [greedy, SamplingParams(temperature=1.0, logprobs=0)], [None, None]).logprobs
    best = int(np.argmax(ref))
    for out in (alone, mixed):
        assert out.logprobs[0].item() == pytest.approx(ref[best], abs=1e-5)
        assert out.top_logprobs[0].tolist() == pytest.approx(np.sort(ref)[::-1][:3].tolist(), abs=1e-5)


def test_processed_logprobs_of_combined_cuts_match_the_reference():
    g = torch.Generator().manual_seed(11)
    sampler = Sampler(torch.device("cpu"), logprobs_mode=LogprobsMode.PROCESSED)
    for _ in range(50):
        logits = torch.randn(4, 40, generator=g) * 2
        params = [SamplingParams(temperature=round(0.1 + 2 * random.Random(i).random(), 3), min_p=0.02 * i,
                                 top_k=[0, 3, 7, 12][i], top_p=[0.5, 0.8, 1.0, 0.95][i], logprobs=5)
                  for i in range(4)]
        out = sampler.sample(logits, params, [None] * 4)
        for i, p in enumerate(params):
            ref = reference_processed_logprobs(logits[i].tolist(), p.temperature, p.min_p, p.top_k, p.top_p)
            chosen = out.sampled_ids[i].item()
            assert np.isfinite(ref[chosen]), "sampled a token the cuts exclude"
            assert out.logprobs.logprobs[i].item() == pytest.approx(ref[chosen], abs=1e-4)
            assert out.logprobs.ranks[i].item() == 1 + int((ref > ref[chosen]).sum())


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", max_num_seqs=8, max_num_batched_tokens=64))


def test_min_tokens_with_a_stop_token_id_outside_the_vocabulary(engine):
    """stop_token_ids past the vocabulary are accepted (the service does too: such an id just never comes); with
    min_tokens the engine banned it by indexing the logits past their end, and the step raised (on the GPU: a
    device-side assert that takes every request down). The in-vocabulary stop id must still be held back."""
    vocab = engine.model_config.vocab_size
    stop_id = ord("q")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, min_tokens=3,
                            stop_token_ids=[vocab + 7, stop_id], logit_bias={stop_id: 100.0})
    outs = run(engine, {"r": (list(b"hi"), params)})["r"]
    tokens = tokens_of(outs)
    assert len(tokens) == 4 and stop_id not in tokens[:3] and tokens[3] == stop_id
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop_id


def stream(prompt_ids: list[int], output_ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(ByteTokenizer(), prompt_ids, [], **kwargs)
    pieces = []
    for i, t in enumerate(output_ids):
        detok.add_token(t)
        pieces.append(detok.take_new_text(finished=i == len(output_ids) - 1))
    return pieces


def test_a_character_the_prompt_leaves_incomplete_comes_with_the_output_token_that_completes_it():
    """A token-id prompt may end inside a character (a client continuing an output cut by max_tokens). The output
    token that completes it must bring the character: the decoded window did not grow, so it was dropped and the
    output began after it."""
    euro = "€".encode()
    assert stream(list(b"ab") + list(euro[:2]), [euro[2], ord("x"), ord("y")]) == ["€", "x", "y"]
    rng = random.Random(5)
    for _ in range(300):
        char = rng.choice(["é", "€", "😀", "中"]).encode()
        cut = rng.randrange(1, len(char))
        text = "".join(rng.choice(["a", " ", "é", "😀"]) for _ in range(rng.randrange(0, 6)))
        prompt = list(b"pre ") + list(char[:cut])
        out = list(char[cut:]) + list(text.encode())
        assert "".join(stream(prompt, out, skip_special_tokens=rng.random() < 0.5)) == char.decode() + text


def test_an_incomplete_prompt_tail_that_never_completes_reads_as_a_full_decode():
    """Bytes of the prompt's unfinished character followed by output bytes that do not continue it: the output text
    is their plain decode (a replacement character, then the output), as a full decode of those bytes gives."""
    euro = "€".encode()
    got = "".join(stream(list(b"ab") + list(euro[:2]), list(b"xy")))
    assert got == (euro[:2] + b"xy").decode("utf-8", errors="replace")


def test_stop_strings_over_multibyte_tokens_with_min_tokens_match_a_rescan():
    """Random texts of one- to four-byte characters, one byte per token, a random stop string: the text handed out is
    the text up to the first occurrence that ends at or after the min_tokens-th token (kept with
    include_stop_str_in_output), and no piece shows part of that stop string before it is known."""
    tok, rng = ByteTokenizer(), random.Random(9)
    alphabet = ["a", "b", "é", "€", "😀"]
    for _ in range(3000):
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        include, min_tokens = rng.random() < 0.5, rng.randrange(0, 5)
        params = SamplingParams(max_tokens=1000, stop=[stop], include_stop_str_in_output=include,
                                min_tokens=min_tokens)
        seq = Sequence("r", [104], params, 0)
        seq.detokenizer = IncrementalDetokenizer(tok, [104], params.stop, include_stop_str_in_output=include)
        pieces = []
        for t in text.encode():
            seq.append_token(t)
            check_stop(seq, t, eos_token_ids=[257], max_model_len=10**6)
            pieces.append(seq.detokenizer.take_new_text(finished=seq.finish_reason is not None))
            if seq.finish_reason:
                break
        expected, reason, start = text, None, text.find(stop)
        while start >= 0:
            if len(text[: start + len(stop)].encode()) >= min_tokens:  # tokens up to the match's end
                expected, reason = text[: start + (len(stop) if include else 0)], stop
                break
            start = text.find(stop, start + 1)
        if reason is None:
            pieces.append(seq.detokenizer.take_new_text(finished=True))
        assert ("".join(pieces), seq.stop_reason) == (expected, reason), (stop, text, include, min_tokens)


def test_top_k_keeps_the_tokens_tied_with_the_kth_largest():
    """vLLM and transformers drop the tokens strictly below the k-th largest logit, so ties at the boundary stay (bf16
    logits tie often). Exactly k were kept, the sort's order choosing among equals: top_k=2 over [2, 1, 1, 0] never
    drew token 2, top_k=1 over a tie always drew the same token."""
    sampler, n = Sampler(torch.device("cpu"), seed=1), 40_000
    for logits, k in (([2.0, 1.0, 1.0, 0.0], 2), ([0.0, 3.0, 3.0, 0.0], 1)):
        x = np.array(logits)
        kept = np.where(x >= np.sort(x)[::-1][k - 1], np.exp(x), 0.0)
        expected = kept / kept.sum()
        rows = torch.tensor(logits).expand(n, -1).contiguous()
        ids = sampler.sample(rows, [SamplingParams(top_k=k)] * n, [None] * n).sampled_ids
        freq = torch.bincount(ids, minlength=4).double().numpy() / n
        assert np.allclose(freq, expected, atol=0.015), (logits, k, freq, expected)


def test_a_tiny_repetition_penalty_keeps_the_logits_finite_and_draws_the_boosted_token():
    """repetition_penalty 1e-40 (accepted: only > 0 is required) divides a seen token's positive logit past float32's
    range. The row must stay a distribution whose most likely token is that one, not NaN (which drew token 0)."""
    from model.engine.penalties import PenaltyState

    vocab = 16
    state = PenaltyState(vocab, torch.device("cpu"), max_rows=2)
    row = state.acquire(prompt_ids=[7], output_ids=[])
    logits = torch.linspace(-3.0, 4.0, vocab).unsqueeze(0)  # token 7's logit is positive; token 0 is the smallest
    params = [SamplingParams(temperature=1.0, repetition_penalty=1e-40)]
    state.apply(logits, torch.tensor([0]), torch.tensor([row]), params)
    assert torch.isfinite(logits).all()
    probs = torch.softmax(logits, dim=-1)
    assert torch.isfinite(probs).all() and int(probs.argmax()) == 7 and float(probs[0, 7]) > 0.99
