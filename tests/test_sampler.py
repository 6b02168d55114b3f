"""Sampler (greedy, temperature, top-k, top-p, seeds) and the stop conditions / incremental detokenizer."""

import math

import pytest
import torch

from model.engine.detokenizer import IncrementalDetokenizer, check_stop
from model.engine.sampler import Sampler
from model.engine.sampling_params import SamplingParams
from model.engine.sequence import Sequence

DEVICE = torch.device("cpu")


def sample(logits, params, generators=None, seed=0):
    sampler = Sampler(DEVICE, seed=seed)
    return sampler.sample(logits, params, generators or [None] * len(params)).sampled_ids.tolist()


def test_greedy_is_argmax():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [SamplingParams(temperature=0.0)] * 7) == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_and_mixed_batch_keeps_greedy_rows():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=0.0)] * 3
    assert sample(logits, params) == logits.argmax(-1).tolist()


def test_temperature_sampling_matches_softmax_frequencies():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    T = 0.7
    logits = (probs.log() * T).expand(40_000, -1).contiguous()  # softmax(logits / T) == probs
    ids = torch.tensor(sample(logits, [SamplingParams(temperature=T)] * logits.shape[0]))
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    # 5 binomial standard errors at n = 40k is < 0.013
    assert torch.allclose(freq, probs, atol=0.013), freq


def test_top_k_restricts_to_k_most_likely():
    logits = torch.randn(2000, 30, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor(sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 2000))
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == ids[:, None]).any(-1).all()
    assert len(set((top3 == ids[:, None]).float().argmax(-1).tolist())) == 3, "all three should be drawn"


def test_top_k_alone_cuts_like_a_sort_per_row():
    """Top-k without top-p takes a topk, not a sort: the kept set must still be every token >= the row's k-th
    largest logit (ties kept), rows without top-k untouched, k past the vocabulary keeping all, -inf rows intact."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-4, 4, (64, 50), generator=g).float()  # many ties
    logits[3, :45] = float("-inf")  # fewer finite tokens than k
    ks = torch.randint(0, 60, (64,), generator=g).tolist()  # 0: no top-k; > 50: past the vocabulary
    params = [SamplingParams(temperature=1.0, top_k=k if k else -1) for k in ks]
    cut = Sampler._apply_top_k_top_p(logits, params)
    for row, k in enumerate(ks):
        kept = torch.isfinite(cut[row])
        if k == 0 or k >= 50:
            assert torch.equal(kept, torch.isfinite(logits[row])), row
            continue
        kth = sorted(logits[row].tolist(), reverse=True)[k - 1]
        assert kept.tolist() == [v >= kth and v > float("-inf") for v in logits[row].tolist()], (row, k)
        assert torch.equal(cut[row][kept], logits[row][kept])


@pytest.mark.parametrize("top_p,allowed", [(0.5, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_prefix_with_enough_mass(top_p, allowed):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1).contiguous()
    ids = set(sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 4000))
    assert ids == allowed


def test_top_k_and_top_p_combine_per_row():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(3000, -1).contiguous()
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.6), SamplingParams(top_k=3, top_p=0.95)] * 1000
    ids = torch.tensor(sample(logits, params)).view(1000, 3)
    assert set(ids[:, 0].tolist()) == {0, 1}
    assert set(ids[:, 1].tolist()) == {0, 1}  # mass before token 2 is 0.7 >= 0.6
    assert set(ids[:, 2].tolist()) == {0, 1, 2}  # top-k cut to 3, then renormalised mass before token 2 < 0.95


def test_seeded_rows_reproduce_regardless_of_batch():
    V = 100
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(DEVICE)
    p = SamplingParams(temperature=1.0, seed=1234)

    def draws(row_logits, batch_pos, batch_size, steps=20):
        g = sampler.new_request_generator(1234)
        out = []
        for _ in range(steps):
            batch = torch.randn(batch_size, V)
            batch[batch_pos] = row_logits
            params = [SamplingParams(temperature=1.0)] * batch_size
            gens = [None] * batch_size
            params[batch_pos], gens[batch_pos] = p, g
            out.append(sampler.sample(batch, params, gens).sampled_ids[batch_pos].item())
        return out

    alone = draws(logits[0], 0, 1)
    assert draws(logits[0], 5, 8) == alone
    assert draws(logits[0], 2, 3) == alone
    assert len(set(alone)) > 3, "a flat-ish distribution should give varied tokens"
    g_other = sampler.new_request_generator(99)
    other = [sampler.sample(logits[:1], [p], [g_other]).sampled_ids[0].item() for _ in range(20)]
    assert other != alone


def test_unseeded_sampling_varies():
    logits = torch.zeros(1, 1000)
    sampler = Sampler(DEVICE)
    draws = {sampler.sample(logits, [SamplingParams()], [None]).sampled_ids[0].item() for _ in range(20)}
    assert len(draws) > 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(seed="x"), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_as_single_string_becomes_list():
    assert SamplingParams(stop="END").stop == ["END"]


# ---- detokenizer and stop conditions -----------------------------------------------------------------------------
class Utf8ByteTokenizer:
    """Token id = one UTF-8 byte (ids >= 256 are special and skipped), the way a byte-level tokenizer decodes."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


EOS = 256


def run_tokens(text_or_ids, params: SamplingParams, prompt: str = "hi "):
    tok = Utf8ByteTokenizer()
    prompt_ids = tok.encode(prompt)
    seq = Sequence("r", prompt_ids, params, 0)
    seq.detokenizer = IncrementalDetokenizer(tok, prompt_ids, params.stop)
    ids = tok.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
    pieces = []
    for t in ids:
        seq.append_token(t)
        check_stop(seq, t, eos_token_ids=[EOS], max_model_len=10_000)
        pieces.append(seq.detokenizer.take_new_text(finished=seq.finish_reason is not None))
        if seq.finish_reason:
            break
    return seq, pieces


def test_multibyte_characters_are_emitted_whole():
    seq, pieces = run_tokens("aé€😀b", SamplingParams(max_tokens=100))
    assert "".join(pieces) == "aé€😀b"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "é"]
    assert seq.finish_reason is None


def test_stop_string_ends_generation_and_is_never_streamed():
    seq, pieces = run_tokens("hello STOP world", SamplingParams(max_tokens=100, stop=["STOP", "xyz"]))
    assert seq.finish_reason == "stop" and seq.stop_reason == "STOP"
    assert "".join(pieces) == "hello "
    assert not any("S" in p for p in pieces)
    assert seq.output_token_ids == list(b"hello STOP"), "generation ends on the token completing the stop string"


def test_withheld_stop_prefix_is_released_when_it_does_not_match():
    seq, pieces = run_tokens("a STAR b", SamplingParams(max_tokens=8, stop=["STOP"]))
    assert seq.finish_reason == "length"
    assert "".join(pieces) == "a STAR b"
    assert pieces[2:5] == ["", "", "STA"], "'S' and 'ST' could begin STOP and wait; 'STA' cannot"


def test_earliest_stop_string_wins():
    seq, pieces = run_tokens("xx abcd", SamplingParams(max_tokens=100, stop=["cd", "abcd"]))
    assert seq.stop_reason == "abcd" and "".join(pieces) == "xx "


def test_stop_token_ids_eos_and_ignore_eos():
    seq, pieces = run_tokens([104, 105, 33, 106], SamplingParams(max_tokens=100, stop_token_ids=[33]))
    assert (seq.finish_reason, seq.stop_reason, "".join(pieces)) == ("stop", 33, "hi")
    seq, pieces = run_tokens([104, EOS, 105], SamplingParams(max_tokens=100))
    assert (seq.finish_reason, seq.stop_reason, "".join(pieces)) == ("stop", None, "h")
    seq, pieces = run_tokens([104, EOS, 105], SamplingParams(max_tokens=3, ignore_eos=True))
    assert (seq.finish_reason, seq.num_output_tokens, "".join(pieces)) == ("length", 3, "hi")


def test_max_tokens_gives_length():
    seq, pieces = run_tokens("abcdefgh", SamplingParams(max_tokens=5))
    assert seq.finish_reason == "length" and seq.stop_reason is None and "".join(pieces) == "abcde"


def test_incomplete_character_is_flushed_at_finish():
    seq, pieces = run_tokens(list("a€".encode())[:-1], SamplingParams(max_tokens=3))
    assert seq.finish_reason == "length"
    assert "".join(pieces) == Utf8ByteTokenizer().decode(seq.output_token_ids)
