"""The incremental detokenizer's hold on text that ends in U+FFFD is bounded. A UTF-8 character spans at most 4 bytes,
so output bytes that never complete one (stray continuation bytes, a lead byte and no continuation) must not keep the
decode window growing (each token re-decoded all of it: quadratic) nor keep their text from the stream until the
request ends. Expected text is the full decode of prompt + output (tests/model_fixtures.completion_text, the text
vLLM's detokenizer ends with), never the detokenizer's own pieces; the tokenizers are the `tiny` model's byte
tokenizer and a byte-level BPE trained here (tokens such as b"\\xbcber" and b"\\xe2\\x9c" cut characters)."""

import random

import pytest

from model.byte_tokenizer import ByteTokenizer
from model.engine.detokenizer import IncrementalDetokenizer, check_stop
from model.engine.sampling_params import SamplingParams
from model.engine.sequence import Sequence
from model.tokenizer import HFTokenizer
from tests.model_fixtures import completion_text, make_tokenizer_files

WINDOW_BOUND = 16  # tokens per decode call: 5 prompt tokens of context, 3 held, a few more (ample)


class CountingTokenizer:
    """Records the number of ids of every decode call (the per-token cost of incremental detokenization)."""

    def __init__(self, inner):
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    make_tokenizer_files(directory)
    return HFTokenizer(directory)


def byte_ids(tokenizer) -> dict[int, int]:
    """byte -> id of the token that is that one byte (the BPE alphabet may lack one or two bytes)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {b: b for b in range(256)}
    return {tokenizer.token_bytes(i)[0]: i for i in range(tokenizer.vocab_size) if len(tokenizer.token_bytes(i)) == 1}


def tokens_of(tokenizer, data: bytes) -> list[int]:
    ids = byte_ids(tokenizer)
    return [ids[b] for b in data]


def stream(tokenizer, prompt: list[int], output: list[int], skip_special_tokens: bool = True):
    """Feed `output` one token at a time; the pieces handed out (the last one at the finish) and the decode calls'
    lengths made while generating."""
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, prompt, [], skip_special_tokens=skip_special_tokens)
    counting.lengths.clear()
    pieces = []
    for i, token in enumerate(output):
        detok.add_token(token)
        pieces.append(detok.take_new_text(finished=i == len(output) - 1))
    return pieces, counting.lengths


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_stray_continuation_bytes_cost_a_bounded_window_and_are_released(name, bpe):
    """800 continuation bytes with no lead byte: each is one U+FFFD of the full decode. The window stayed at the
    read offset, so the 800th token decoded 800+ ids, and nothing was handed out before the finish."""
    tokenizer = ByteTokenizer() if name == "byte" else bpe
    rng = random.Random(1)
    prompt = tokenizer.encode("say ")
    output = tokens_of(tokenizer, bytes(rng.choice([0x80, 0x99, 0xA9, 0xBF]) for _ in range(800)))
    pieces, lengths = stream(tokenizer, prompt, output)
    assert "".join(pieces) == completion_text(tokenizer, prompt, output) == "\ufffd" * 800
    assert max(lengths) <= WINDOW_BOUND, max(lengths)
    assert len(lengths) <= 4 * len(output), "decode calls per token"
    running = "".join(pieces[:-1])
    assert len(running) >= 800 - 1 - 3, "at most an unfinished character's tokens may wait"
    assert all(len("".join(pieces[: i + 1])) >= i + 1 - 3 for i in range(len(pieces)))


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_a_character_split_after_a_run_of_stray_bytes_still_comes_whole(name, bpe):
    """The release keeps the last tokens, which may hold a character's first bytes: six stray bytes, then 😀 one
    byte per token, comes out as six U+FFFD and the emoji (releasing its lead byte early made a seventh U+FFFD and
    lost the emoji)."""
    tokenizer = ByteTokenizer() if name == "byte" else bpe
    prompt = tokenizer.encode("x ")
    output = tokens_of(tokenizer, b"\x80" * 6 + "😀".encode() + b"!")
    pieces, _ = stream(tokenizer, prompt, output)
    assert "".join(pieces) == completion_text(tokenizer, prompt, output) == "\ufffd" * 6 + "😀!"
    assert "".join(pieces[:9]).count("\ufffd") >= 3, "stray bytes released before the emoji completes"
    assert any("😀" in p for p in pieces)


ALPHABET = ["a", " ", "é", "€", "😀", "中"]


def random_output(rng: random.Random, tokenizer, with_specials: bool) -> list[int]:
    """A mix that stalls and recovers: stray continuation bytes, lone lead bytes, characters one byte per token,
    whole-vocabulary tokens (for the BPE: pieces like b"\\xbcber" and b"\\xe2\\x9c" that cut characters)."""
    out: list[int] = []
    for _ in range(rng.randrange(1, 40)):
        kind = rng.random()
        if kind < 0.3:
            out += tokens_of(tokenizer, bytes(rng.randrange(0x80, 0xC0) for _ in range(rng.randrange(1, 9))))
        elif kind < 0.4:
            out += tokens_of(tokenizer, bytes([rng.choice([0xC3, 0xE2, 0xF0, 0xE4])]))
        elif kind < 0.7:
            out += tokens_of(tokenizer, rng.choice(ALPHABET).encode())
        else:
            token = rng.randrange(tokenizer.vocab_size)
            if with_specials or tokenizer.decode([token], skip_special_tokens=True) != "":
                out.append(token)
    return out


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_random_streams_read_as_the_full_decode_with_a_bounded_window(name, bpe):
    tokenizer = ByteTokenizer() if name == "byte" else bpe
    rng = random.Random(7)
    for trial in range(400):
        char = rng.choice(ALPHABET).encode()
        cut = rng.randrange(0, len(char))  # a token-id prompt may end inside a character
        prompt = tokens_of(tokenizer, b"pre " + char[:cut])
        output = random_output(rng, tokenizer, with_specials=trial % 2 == 0)
        pieces, lengths = stream(tokenizer, prompt, output)
        expected = completion_text(tokenizer, prompt, output)
        assert "".join(pieces) == expected, (trial, prompt, output)
        assert max(lengths, default=0) <= WINDOW_BOUND, (trial, output)


def run_with_stop(tokenizer, output: list[int], stop: list[str], max_tokens: int = 10_000):
    params = SamplingParams(max_tokens=max_tokens, stop=stop)
    prompt = tokenizer.encode("hi ")
    seq = Sequence("r", prompt, params, 0)
    seq.detokenizer = IncrementalDetokenizer(tokenizer, prompt, params.stop)
    pieces = []
    for token in output:
        seq.append_token(token)
        check_stop(seq, token, eos_token_ids=tokenizer.eos_token_ids, max_model_len=100_000)
        pieces.append(seq.detokenizer.take_new_text(finished=seq.finish_reason is not None))
        if seq.finish_reason:
            break
    return seq, pieces


def test_a_stop_string_after_stray_bytes_is_still_held_back_and_cut():
    tokenizer = ByteTokenizer()
    seq, pieces = run_with_stop(tokenizer, list(b"\x80" * 10 + b"ab STOP cd"), ["STOP"])
    assert seq.finish_reason == "stop" and seq.stop_reason == "STOP"
    assert "".join(pieces) == "\ufffd" * 10 + "ab "
    assert not any("S" in p for p in pieces)
    assert "".join(pieces[:10]).count("\ufffd") >= 10 - 3


def test_a_stop_string_of_replacement_characters_is_found_in_released_text():
    """The held text was never scanned for stop strings until the finish (and the flush does not scan): a stop
    string of two U+FFFD over a run of stray bytes let the request run to max_tokens with the stop string in its
    text. It now ends within an unfinished character's tokens of the match, the text cut before it."""
    tokenizer = ByteTokenizer()
    seq, pieces = run_with_stop(tokenizer, list(b"ok" + b"\x80" * 50), ["\ufffd\ufffd"], max_tokens=52)
    assert seq.finish_reason == "stop" and seq.stop_reason == "\ufffd\ufffd"
    assert "".join(pieces) == "ok"
    assert seq.num_output_tokens <= 2 + 2 + 3
