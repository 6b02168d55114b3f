"""Stop strings: the incremental matcher agrees with a plain rescan, and its cost per token stays bounded however
long the text and the stop strings are (issue 17 item 1: 16 long stop strings used to cost milliseconds per token
on the engine thread)."""

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from model.engine.detokenizer import IncrementalDetokenizer, check_stop
from model.engine.sampling_params import SamplingParams
from model.engine.sequence import Sequence
from model.engine.stop_strings import StopStringMatcher
from tests.test_sampler import EOS, Utf8ByteTokenizer


def rescan(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """The reference: every occurrence that ends in text[new_from:], the earliest start wins (then list order)."""
    best = None
    for stop in stops:
        pos = text.find(stop, max(0, new_from - len(stop) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best


def held_back(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=6), min_size=1, max_size=4),
       chunks=st.lists(st.text("abc", min_size=1, max_size=3), max_size=25))
def test_matcher_agrees_with_a_rescan(stops, chunks):
    matcher, text = StopStringMatcher(stops), ""
    for chunk in chunks:
        before, text = len(text), text + chunk
        found = matcher.feed(text)
        assert found == rescan(text, before, stops), (text, before)
        if found is not None:
            return
        assert matcher.partial_match_len() == held_back(text, stops), text


def test_sixteen_long_stop_strings_cost_little_per_token():
    """3000 tokens against 16 stop strings of 1024 characters whose first character the text repeats: a rescan of
    the tail took ~8 ms per token here (24 s in all); the matcher takes microseconds (bound: 2 s for all)."""
    stops = [("ab" * 512)[:1023] + chr(0x4E00 + i) for i in range(16)]
    params = SamplingParams(max_tokens=10**6, stop=stops)
    tokenizer = Utf8ByteTokenizer()
    seq = Sequence("r", [104], params, 0)
    seq.detokenizer = IncrementalDetokenizer(tokenizer, [104], params.stop)
    started = time.perf_counter()
    for _ in range(3000):
        seq.append_token(ord("a"))
        check_stop(seq, ord("a"), eos_token_ids=[EOS], max_model_len=10**7)
        seq.detokenizer.take_new_text(finished=False)
    elapsed = time.perf_counter() - started
    assert seq.finish_reason is None
    assert elapsed < 2.0, f"{elapsed:.2f} s for 3000 tokens"


def test_stop_token_ids_are_checked_by_set_membership():
    params = SamplingParams(stop_token_ids=list(range(1000, 2024)))
    assert isinstance(params.stop_token_id_set, frozenset) and 2023 in params.stop_token_id_set
