"""/v1/completions hunt (session 26): defects found over a real loopback server, with the official `openai` client
and raw httpx. Expected values come from the API's definition (OpenAI's completions shape, docs/service.md) and from
the tiny model's logits recomputed in this process (tests/reference_model.py), never from the server's helpers.

The tiny model's tokenizer: one id per UTF-8 byte, then 256 <|endoftext|>, 257 <|im_start|>, 258 <|im_end|>.
"""

import httpx
import openai
import pytest
import torch

from tests.reference_model import full_forward, tiny_reference_model
from tests.service_fixtures import API_KEY, served  # noqa: F401

TOL = 2e-4
SPECIAL = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    return tiny_reference_model()


def token_text(token_id: int) -> str:
    if token_id in SPECIAL:
        return SPECIAL[token_id]
    try:
        return bytes([token_id]).decode("utf-8")
    except UnicodeDecodeError:
        return f"bytes:\\x{token_id:02x}"


def post(served, body: dict) -> httpx.Response:  # noqa: F811
    return httpx.post(served.base_url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def streamed_choice(client, **kwargs) -> tuple[str, dict, list | None]:
    """A one-choice stream put back together: (text, logprobs lists, prompt_logprobs)."""
    text, lp, prompt_lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, None
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                for key in lp:
                    lp[key] += getattr(c.logprobs, key)
            prompt_lp = prompt_lp or c.model_extra.get("prompt_logprobs")
    return text, lp, prompt_lp


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("logprobs,prompt_logprobs", [(1, 4), (4, 1), (0, 3)])
def test_echo_logprobs_and_prompt_logprobs_each_keep_their_own_k(client, reference, stream, logprobs,
                                                                  prompt_logprobs):
    """OpenAI's `logprobs: k` gives the k best (plus the chosen token) for every token, the echoed prompt's too;
    vLLM's `prompt_logprobs: k` the k best plus the prompt token. Asked together with different k, each field
    had the larger k's alternatives (the engine computes one set of prompt alternatives for both)."""
    prompt = "Route me"
    ids = list(prompt.encode())
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=logprobs,
                  extra_body={"prompt_logprobs": prompt_logprobs})
    if stream:
        text, lp, prompt_lp = streamed_choice(client, **kwargs)
        top = lp["top_logprobs"]
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, top, prompt_lp = choice.text, choice.logprobs.top_logprobs, choice.model_extra["prompt_logprobs"]
    assert text == prompt
    rows = torch.log_softmax(full_forward(reference, ids).double(), dim=-1)
    assert top[0] is None and prompt_lp[0] is None
    for i in range(1, len(ids)):
        row = rows[i - 1]
        best = row.topk(logprobs).indices.tolist()
        assert set(top[i]) == {token_text(t) for t in best} | {token_text(ids[i])}, i
        best = row.topk(prompt_logprobs).indices.tolist()
        assert set(prompt_lp[i]) == {str(t) for t in best} | {str(ids[i])}, i
        for t, entry in prompt_lp[i].items():
            assert entry["logprob"] == pytest.approx(row[int(t)].item(), abs=TOL)


@pytest.mark.parametrize("key", ["²", "³", "¹0"])
def test_logit_bias_key_of_non_ascii_digits_is_a_400_not_a_500(served, key):  # noqa: F811
    """logit_bias keys are token ids written as decimal strings; "²" passes str.isdigit() but is no number.
    Bad input never gets a 5xx (docs/service.md, Errors)."""
    r = post(served, {"prompt": "Hi", "max_tokens": 1, "logit_bias": {key: 1.0}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == f"logit_bias.{key}"


@pytest.mark.parametrize("stream", [False, True])
def test_echo_text_offset_counts_special_token_text_typed_in_a_text_prompt(client, stream):
    """text_offset[i] is where token i starts in the choice's text. A text prompt is echoed as the client's
    string, so special-token text typed in it ("<|im_end|>", one special token) stands in the text and the tokens
    after it start after it: "a<|im_end|>bc" has 'b' at 11, not at 1."""
    prompt = "a<|im_end|>bc"
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    if stream:
        text, lp, _ = streamed_choice(client, **kwargs)
        tokens, offsets = lp["tokens"], lp["text_offset"]
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    assert text == prompt and tokens == ["a", "<|im_end|>", "b", "c"]
    assert offsets == [0, 1, 11, 12]
    assert all(text.startswith(t, o) for t, o in zip(tokens, offsets))


def test_echo_of_token_ids_still_skips_special_tokens_in_offsets(served):  # noqa: F811
    """The other side of the fix above: a prompt of token ids is echoed decoded, special tokens left out, so they
    add nothing to the offsets ([97, 258, 98] echoes "ab")."""
    r = post(served, {"prompt": [97, 258, 98], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab" and choice["logprobs"]["text_offset"] == [0, 1, 1]
