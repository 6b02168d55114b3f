"""Logprobs over HTTP with the official client, completions and chat, streaming and not, echo and prompt_logprobs:
every number equals a full-vocabulary log_softmax of the tiny model's logits, recomputed in this process by one plain
prefill of prompt + output (tests/reference_model.py), and the shapes are OpenAI's (and vLLM's for
prompt_logprobs)."""

import openai
import pytest
import torch

from tests.reference_model import full_forward, tiny_reference_model
from tests.service_fixtures import API_KEY, served  # noqa: F401

TOL = 2e-4


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    return tiny_reference_model()


SPECIAL = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}  # the tiny model's byte tokenizer


def token_text(token_id: int) -> str:
    """How the API writes a token (independently of the server's code): a special token's name, a byte's
    character, or bytes:\\xNN for a byte that is no character alone."""
    if token_id in SPECIAL:
        return SPECIAL[token_id]
    raw = bytes([token_id])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"bytes:\\x{token_id:02x}"


def text_to_id(text: str) -> int:
    names = {v: k for k, v in SPECIAL.items()}
    if text in names:
        return names[text]
    if text.startswith("bytes:\\x"):
        return int(text[8:], 16)
    return text.encode("utf-8")[0]


def log_softmax_rows(reference, token_ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(full_forward(reference, token_ids).double(), dim=-1)  # [L, V]


def check_completion_logprobs(reference, prompt_ids: list[int], output_ids: list[int], lp, k: int, echo: bool):
    rows = log_softmax_rows(reference, prompt_ids + output_ids)
    ids = (prompt_ids if echo else []) + output_ids
    first = 0 if echo else len(prompt_ids)
    assert [text_to_id(t) for t in lp.tokens] == ids
    assert lp.tokens == [token_text(t) for t in ids]
    for i, token in enumerate(ids):
        position = first + i
        if position == 0:
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            continue
        row = rows[position - 1]
        assert lp.token_logprobs[i] == pytest.approx(row[token].item(), abs=TOL)
        best = row.topk(k)
        expected = {token_text(t): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
        expected.setdefault(token_text(token), row[token].item())
        assert set(lp.top_logprobs[i]) == set(expected)
        for t, v in lp.top_logprobs[i].items():
            assert v == pytest.approx(expected[t], abs=TOL)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0 if echo else True


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs_match_reference(client, reference, stream, echo):
    prompt = "The MoE router sends tokens"
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0.9, seed=11, logprobs=3, echo=echo,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    if stream:
        chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
        tokens, token_logprobs, top, offsets = [], [], [], []
        for c in chunks:
            lp = c.choices[0].logprobs
            tokens += lp.tokens
            token_logprobs += lp.token_logprobs
            top += lp.top_logprobs
            offsets += lp.text_offset
        output_ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
        lp = type("LP", (), dict(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                 text_offset=offsets))
    else:
        choice = client.completions.create(**kwargs).choices[0]
        lp, output_ids = choice.logprobs, choice.model_extra["token_ids"]
    assert len(output_ids) == 6
    check_completion_logprobs(reference, list(prompt.encode()), output_ids, lp, 3, echo)


def test_echo_with_max_tokens_zero_scores_the_prompt(client, reference):
    prompt = "score me"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    choice = r.choices[0]
    assert choice.text == prompt and r.usage.completion_tokens == 0
    check_completion_logprobs(reference, list(prompt.encode()), [], choice.logprobs, 0, echo=True)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_prompt_logprobs_match_reference(client, reference, stream):
    messages = [{"role": "user", "content": "Which expert?"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=5, temperature=0.7, seed=3, logprobs=True,
                  top_logprobs=4, extra_body={"ignore_eos": True, "prompt_logprobs": 2, "return_token_ids": True})
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        content = [item for c in chunks if c.choices[0].logprobs for item in c.choices[0].logprobs.content]
        prompt_lp = next(c.choices[0].model_extra["prompt_logprobs"] for c in chunks
                         if c.choices[0].model_extra.get("prompt_logprobs"))
        output_ids = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])]
    else:
        r = client.chat.completions.create(**kwargs)
        content, prompt_lp = r.choices[0].logprobs.content, r.choices[0].model_extra["prompt_logprobs"]
        output_ids = r.choices[0].model_extra["token_ids"]
    prompt_ids = [256 + 1] + list(b"user\nWhich expert?") + [258] + list(b"\n") + [257] + list(b"assistant\n")
    rows = log_softmax_rows(reference, prompt_ids + output_ids)
    assert len(content) == len(output_ids) == 5
    for i, (item, token) in enumerate(zip(content, output_ids)):
        row = rows[len(prompt_ids) - 1 + i]
        assert item.token == token_text(token) and item.bytes == list(token_text(token).encode() if token in SPECIAL
                                                                         else bytes([token]))
        assert item.logprob == pytest.approx(row[token].item(), abs=TOL)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(row.topk(4).values.tolist(), abs=TOL)
        assert [text_to_id(t.token) for t in item.top_logprobs] == row.topk(4).indices.tolist()
    assert len(prompt_lp) == len(prompt_ids) and prompt_lp[0] is None
    for position in range(1, len(prompt_ids)):
        row, token = rows[position - 1], prompt_ids[position]
        entry = prompt_lp[position]
        assert entry[str(token)]["logprob"] == pytest.approx(row[token].item(), abs=TOL)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        for t in row.topk(2).indices.tolist():
            assert entry[str(t)]["logprob"] == pytest.approx(row[t].item(), abs=TOL)


def test_logprobs_off_by_default_and_token_ids_spelling(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert r.choices[0].logprobs is None
    r = client.completions.create(model="tiny", prompt="a", max_tokens=2, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    assert r.choices[0].logprobs.tokens == [f"token_id:{t}" for t in r.choices[0].model_extra["token_ids"]]


@pytest.mark.parametrize("body,text", [
    ({"prompt": [256, 257, 97], "max_tokens": 0, "echo": True}, "a"),  # special prompt tokens, echoed
    ({"prompt": "x", "max_tokens": 4, "allowed_token_ids": [257, 97], "temperature": 1.0, "seed": 0,
      "ignore_eos": True}, None),  # special tokens generated among text
])
def test_text_offset_indexes_the_returned_text_when_special_tokens_are_skipped(served, body, text):
    """OpenAI's text_offset[i] is where token i starts in `text`. Special tokens that skip_special_tokens (the
    default) leaves out of the text add nothing: [256, 257, 97] echoed is "a" with offsets [0, 0, 0], not
    [0, 13, 25] (the special tokens' own lengths)."""
    import httpx

    r = httpx.post(served.base_url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={**body, "logprobs": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    if text is not None:
        assert choice["text"] == text and offsets == [0, 0, 0]
    ids = body["prompt"] if body.get("echo") else choice["token_ids"]
    assert any(i >= 256 for i in ids) and any(i < 256 for i in ids), ids
    shown = [t if i < 256 else "" for i, t in zip(ids, tokens)]  # the byte tokenizer's special ids are >= 256
    assert offsets == [len("".join(shown[:i])) for i in range(len(shown))], (choice["text"], tokens, offsets)
    assert "".join(shown) == choice["text"]
