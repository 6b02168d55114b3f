"""/v1/completions `text_offset` over a real loopback server, streamed and not. OpenAI's text_offset[i] is where
token i starts in the choice's text; a token past the text's end (a stop string cut it away) is at the end. The
streamed offsets, put back together, must be the non-streamed ones: a stream sent the offsets of the tokens held back
while they might begin a stop string before the stop string cut them, past the final text's end.

Expected offsets are computed here from the definition over the tiny model's byte tokenizer (one id per UTF-8 byte,
specials >= 256): token i, whose byte is the i-th, starts at the character holding that byte, which is the last
character of the replacement decode of the bytes up to and including it."""

import json

import httpx
import pytest

from model.byte_tokenizer import ByteTokenizer
from model.engine.logprobs import TokenLogprobs
from service.logprobs_format import CompletionLogprobs, TokenTexts
from tests.service_fixtures import API_KEY, served  # noqa: F401

PROMPT = "The MoE router"


def post(served, body: dict) -> dict:  # noqa: F811
    r = httpx.post(served.base_url + "/v1/completions", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def post_stream(served, body: dict) -> tuple[str, dict, list[dict]]:  # noqa: F811
    """A one-choice stream put back together: (text, logprobs lists, the chunks' choices)."""
    text, lp, items = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, []
    with httpx.stream("POST", served.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: "):])["choices"]:
                    items.append(choice)
                    text += choice["text"]
                    for key in lp if choice["logprobs"] else ():
                        lp[key] += choice["logprobs"][key]
    return text, lp, items


def expected_offsets(token_ids: list[int], text: str) -> list[int]:
    data = bytes(token_ids)
    return [min(len(data[: i + 1].decode("utf-8", "replace")) - 1, len(text)) for i in range(len(data))]


@pytest.fixture(scope="module")
def greedy(served):  # noqa: F811
    """The tiny model's greedy continuation: its text and byte tokens (no special token among them)."""
    choice = post(served, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                           "return_token_ids": True})
    ids = choice["token_ids"]
    assert all(t < 256 for t in ids), ids  # the definition above reads one byte per token
    assert choice["text"] == bytes(ids).decode("utf-8", "replace")
    return choice["text"], ids


def stop_cases(text: str) -> list[tuple[str, list[str], bool]]:
    """(name, stop, include_stop_str_in_output): a three-character stop string found in the text (its tokens held
    back, then cut), kept or not, and one whose first two characters occur but never the third (held, then sent)."""
    at = next(a for a in range(6, len(text) - 3) if text.find(text[a:a + 3]) == a)
    cut = text[at:at + 3]
    near = text[at:at + 2] + next(c for c in "~#@|" if text[at:at + 2] + c not in text)
    return [("cut", [cut], False), ("cut_kept", [cut], True), ("released", [near], False)]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["cut", "cut_kept", "released"])
def test_streamed_text_offsets_are_the_non_streamed_ones_around_stop_strings(served, greedy, case):  # noqa: F811
    full_text, full_ids = greedy
    name, stop, include = stop_cases(full_text)[case]
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "stop": stop, "include_stop_str_in_output": include, "return_token_ids": True}
    choice = post(served, body)
    ids, text = choice["token_ids"], choice["text"]
    assert ids == full_ids[: len(ids)]
    if name == "released":
        assert choice["finish_reason"] == "length" and text == full_text
    else:
        at = full_text.find(stop[0])
        assert choice["finish_reason"] == "stop" and text == full_text[: at + (len(stop[0]) if include else 0)]
    offsets = choice["logprobs"]["text_offset"]
    assert offsets == expected_offsets(ids, text)
    if name == "cut":
        assert offsets[-3:] == [len(text)] * 3, "the stop string's tokens lie past the cut"

    streamed_text, lp, items = post_stream(served, body)
    assert streamed_text == text
    assert lp["text_offset"] == offsets, "streamed offsets, put back together, are the non-streamed ones"
    assert lp["tokens"] == choice["logprobs"]["tokens"]
    assert lp["token_logprobs"] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-4)
    sent = 0
    for item in items:  # no chunk's offset points past the text sent up to it
        sent += len(item["text"])
        assert all(o <= sent for o in (item["logprobs"] or {}).get("text_offset", [])), item


def test_a_token_after_an_unfinished_character_starts_after_its_replacement_character():
    """A lead byte (0xC3) then '[': the decode is U+FFFD (the lead byte's) then '[', so '[' starts one character
    later than the lead byte. It was given the lead byte's offset, where the text holds U+FFFD, not '['."""
    data = [0xC3, ord("["), 0xE2, 0x82, 0xAC, 0x80, ord("a"), 0xF0, 0x9F, 0xE2, ord("b"), 0xE2, 0x82, 0xF0]
    logprobs = CompletionLogprobs(TokenTexts(ByteTokenizer()))
    offsets = logprobs.add([TokenLogprobs(t, -1.0, 1, []) for t in data])["text_offset"]
    text = bytes(data).decode("utf-8", "replace")
    assert offsets == expected_offsets(data, text)
    assert offsets[1] == 1 and text[1] == "["
